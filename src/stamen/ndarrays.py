"""The only NumPy codec of Stamen: arrays <-> ``.npy`` bytes.

Each array travels as a standard ``.npy`` (format 1.0/2.0) blob, which is what Flower
sends (``tensor_type = "numpy.ndarray"``). Pickle is never used: object arrays are refused
when encoding and refused when decoding (which never unpickles).

Decoding gives copies (:func:`parameters_to_ndarrays`, writable, as Flower's) or read-only
views over the tensor bytes (:func:`parameters_to_views`, no copy: for code that only reads
the arrays, such as aggregation).

Messages received in frames land in a :class:`ReceivedBuffer`. Who may write into one,
and when it is released, is one object, a :class:`Lease`, which the receiver of the
message makes and hands on as an argument: only a held lease turns the read-only views of
the message into writable arrays over the same memory (:meth:`Lease.alias`: the node hands
a NumPyClient the received model without copying it; the server's FedAvg turns the first
reply into its running mean), and it runs release callbacks when that memory is freed or
kept (the server's fleet makes a large reply's receive slot follow it when it folds the
reply: ``stamen.protocol.mailbox.ReplyUse``). An array still in its
``.npy`` place becomes a tensor again without a copy (:func:`ndarray_to_tensor`).
"""

from __future__ import annotations

import functools
import io
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import numpy as np

from ._ast_guard import PARSE_LOCK
from .errors import ConfigError, DecodeError
from .memory import BufferPool
from .messages import Parameters
from .typing import NDArray, NDArrays

__all__ = [
    "POOLED_FROM",
    "RECEIVE_POOL",
    "TENSOR_TYPE",
    "Lease",
    "ReceivedBuffer",
    "as_ndarray",
    "bytes_to_ndarray",
    "bytes_to_ndarray_view",
    "copy_on_write_with",
    "ndarray_to_bytes",
    "ndarray_to_sendable",
    "ndarray_to_tensor",
    "ndarrays_to_parameters",
    "npy_placed",
    "parameters_to_ndarrays",
    "parameters_to_views",
    "pooled_parameters",
    "received_buffer_of",
    "tensor_with_array",
]

TENSOR_TYPE = "numpy.ndarray"

POOLED_FROM = 16 << 20
"""Received messages and tensors encoded for sending of this many bytes or more are put in
pooled memory."""

RECEIVE_POOL = BufferPool()
"""Where large received messages and encoded tensors land (one pool per process)."""


def as_ndarray(value: object) -> NDArray:
    """``value`` as an array, as ``np.save`` (so Flower) takes it: ``np.asarray``.

    A NumPy scalar (``np.float64``, ``np.int64``) or a Python number gives a 0-d array,
    a (nested) list a 1-d or n-d array of NumPy's dtype for it (``[1, 2]``: int64).

    Raises:
        ConfigError: ``value`` does not make an array (a ragged list), or makes an array
            of Python objects (``None``, mixed types), which only pickle could send.
    """
    if isinstance(value, np.ndarray):
        return value
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"expected an array or array-like, received a {type(value).__name__} that NumPy "
            f"cannot make an array of: {exc}"
        ) from exc
    if array.dtype.hasobject:
        raise ConfigError(
            f"expected an array or array-like, received a {type(value).__name__} that makes "
            "an array of Python objects, which cannot be sent without pickle; convert it to "
            "a numeric array"
        )
    return array


def ndarray_to_bytes(ndarray: NDArray) -> bytes:
    """Serialize one array to ``.npy`` bytes.

    Like Flower's (``np.save``), it takes any array-like: a NumPy scalar, a number, a
    (nested) list (:func:`as_ndarray`).

    Raises:
        ConfigError: ``ndarray`` is not array-like, or holds Python objects (which could
            only travel as pickle).
    """
    ndarray = as_ndarray(ndarray)
    if ndarray.dtype.hasobject:
        raise ConfigError(
            f"arrays of dtype {ndarray.dtype} hold Python objects and cannot be sent "
            "without pickle; convert them to a numeric dtype"
        )
    if ndarray.flags.c_contiguous or not ndarray.flags.f_contiguous:
        data = np.ascontiguousarray(ndarray)
        fortran = False
    else:
        data, fortran = ndarray.T, True  # F-ordered memory is the transpose's C order
    # One copy: the header and the array's memory joined into the blob.
    return b"".join([_npy_header(ndarray, fortran), data.reshape(-1).view(np.uint8).data])


def _npy_header(ndarray: NDArray, fortran: bool) -> bytes:
    """The ``.npy`` magic and header of ``ndarray`` stored in Fortran or C order."""
    header = {
        "descr": np.lib.format.dtype_to_descr(ndarray.dtype),
        "fortran_order": fortran,
        "shape": ndarray.shape,
    }
    head = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(head, header)
    except ValueError:  # a header over 64 KiB (a huge structured dtype): format 2.0
        head = io.BytesIO()
        np.lib.format.write_array_header_2_0(head, header)
    return head.getvalue()


class ReceivedBuffer(np.ndarray[Any, np.dtype[np.uint8]]):
    """The bytes of one message received in frames, owned by its receiver.

    Decoding gives read-only views into it (as for any message). Writing into it takes a
    :class:`Lease` on it, which only its receiver makes. Callbacks registered with
    :meth:`when_released` run when the buffer is freed, or earlier, when its receiver
    keeps the memory (:meth:`kept`).

    Large tensors encoded only to be sent (:func:`ndarray_to_sendable`) are read-only
    buffers of this type too, so that they come from the same pool.
    """

    _callbacks: list[Callable[[], None]]
    _release: _Finalizer | None

    @classmethod
    def allocate(cls, size: int, pool: BufferPool | None = None) -> ReceivedBuffer:
        """An uninitialized buffer of ``size`` bytes: from ``pool`` (default: the
        process's :data:`RECEIVE_POOL`) from :data:`POOLED_FROM` bytes on, so the next
        message of that size lands in memory already mapped; smaller ones from NumPy's
        allocator."""
        if size < POOLED_FROM:
            return np.empty(size, dtype=np.uint8).view(cls)
        block, give_back = (RECEIVE_POOL if pool is None else pool).take(size)
        buffer = block.view(cls)
        buffer._release = weakref.finalize(buffer, _released, give_back, buffer._callbacks)
        return buffer

    def __array_finalize__(self, obj: object) -> None:
        self._callbacks = []
        self._release = None

    def land(self, offset: int, chunk: bytes | memoryview) -> ReceivedBuffer:
        """Copy ``chunk`` (a frame of the message, landing) in at ``offset``; return the
        buffer that holds the message from now on: this one (a spill file's may hand it
        over to memory, :class:`~stamen.server.spill.SpillBuffer`)."""
        self.data[offset : offset + len(chunk)] = chunk
        return self

    def when_released(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from any thread) when the buffer is freed or kept.

        A pooled buffer is back in its pool before any callback runs: a callback that lets
        the next message in (a receive slot) then finds this memory free for it.
        """
        if self._release is None:  # not pooled, or a view made by slicing
            self._release = weakref.finalize(self, _released, None, self._callbacks)
        self._callbacks.append(callback)

    def kept(self) -> None:
        """The receiver keeps this memory (as its own array): run the release callbacks
        now, as they would have run had the buffer been freed."""
        _run_all(self._callbacks)


_Callbacks: TypeAlias = list[Callable[[], None]]
_Finalizer: TypeAlias = "weakref.finalize[[Callable[[], None] | None, _Callbacks], ReceivedBuffer]"


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    while callbacks:
        callbacks.pop(0)()


def _released(give_back: Callable[[], None] | None, callbacks: list[Callable[[], None]]) -> None:
    """A buffer died: its memory back to the pool first, then its callbacks."""
    if give_back is not None:
        give_back()
    _run_all(callbacks)


def received_buffer_of(array: NDArray) -> ReceivedBuffer | None:
    """The :class:`ReceivedBuffer` whose memory ``array`` views, or None."""
    base: object = array
    while isinstance(base, np.ndarray) and not isinstance(base, ReceivedBuffer):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, ReceivedBuffer) else None


def _alias(view: NDArray, root: ReceivedBuffer) -> NDArray | None:
    """A writable array over the memory of ``view``, which lies in ``root``; None if it
    cannot be one (not contiguous, or not inside ``root``)."""
    offset = view.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    contiguous = view.flags.c_contiguous or view.flags.f_contiguous
    if not contiguous or offset < 0 or offset + view.nbytes > root.nbytes:
        return None
    # Over a memoryview of the buffer: NumPy keeps it as the .base (a view of the buffer
    # itself would skip to the memory's owner), so received_buffer_of finds the buffer.
    flat = np.frombuffer(root.data, dtype=view.dtype, count=view.size, offset=offset)
    return flat.reshape(view.shape, order="F" if not view.flags.c_contiguous else "C")


def _buffer_of_tensor(tensor: bytes | memoryview) -> ReceivedBuffer | None:
    return received_buffer_of(np.frombuffer(tensor, dtype=np.uint8))


class Lease:
    """Who owns the received memory a message lies in, and until when.

    The receiver of a message makes its lease (the node's loop for an instruction, the
    fleet for a reply's receive slot, a :class:`~stamen.server.strategy.FitAccumulator`
    for a fit result the server hands it): the lease names the writable
    :class:`ReceivedBuffer` (s) the message lies in, and making it says that nothing else
    reads that memory. While the lease is held its holder may write into that memory
    (:meth:`alias`); :meth:`transfer` hands it on (the giver's lease no longer holds) and
    :meth:`end` gives it up. Arrays aliased earlier stay writable: they are the holder's.

    A lease never keeps its buffers alive (it refers to them weakly): the arrays and
    tensors over them do. :meth:`when_released` callbacks run when every named buffer has
    been freed, or kept by the holder (:meth:`keep`). A message that came as ``bytes``
    lies in no buffer: its lease names none, and decoding under it copies.

    Args:
        buffers: The buffers the message lies in; read-only ones (encoded only to be
            sent, or a pooled global model) are nobody's to write and are left out.
    """

    __slots__ = ("_held", "_refs")

    def __init__(self, buffers: Iterable[ReceivedBuffer] = ()) -> None:
        refs: dict[int, weakref.ref[ReceivedBuffer]] = {}
        for buffer in buffers:
            if buffer.flags.writeable:
                refs.setdefault(id(buffer), weakref.ref(buffer))
        self._refs: tuple[weakref.ref[ReceivedBuffer], ...] = tuple(refs.values())
        self._held = True

    @classmethod
    def over(cls, tensors: Iterable[bytes | memoryview]) -> Lease:
        """The lease on the buffers ``tensors`` lie in (made by their receiver)."""
        return cls(b for b in map(_buffer_of_tensor, tensors) if b is not None)

    @property
    def held(self) -> bool:
        """True until the lease is handed on or ended."""
        return self._held

    @property
    def buffers(self) -> tuple[ReceivedBuffer, ...]:
        """The named buffers still alive (none once the lease is handed on or ended)."""
        return tuple(b for b in (ref() for ref in self._refs) if b is not None)

    def _check(self, action: str) -> None:
        if not self._held:
            raise RuntimeError(f"Lease.{action}: the lease was handed on or ended")

    def alias(self, view: NDArray) -> NDArray | None:
        """A writable array over the memory of ``view`` if it lies in a buffer this lease
        names; None otherwise (copy it instead). Every other view of the message (its
        tensors included) sees what is written through the alias.

        Raises:
            RuntimeError: the lease was handed on or ended.
        """
        self._check("alias")
        root = received_buffer_of(view)
        if root is None or not any(ref() is root for ref in self._refs):
            return None
        return _alias(view, root)

    def transfer(self) -> Lease:
        """Hand the lease on: the returned one holds it, this one no longer does.

        Raises:
            RuntimeError: the lease was handed on or ended.
        """
        self._check("transfer")
        taken = Lease()
        taken._refs, self._refs, self._held = self._refs, (), False
        return taken

    def end(self) -> None:
        """Give the lease up: no alias can be made under it any more."""
        self._refs, self._held = (), False

    def when_released(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once (from any thread) when every named buffer has been
        freed or kept; at once if the lease names none (or all are gone already).

        Raises:
            RuntimeError: the lease was handed on or ended.
        """
        self._check("when_released")
        buffers = self.buffers
        if not buffers:
            callback()
            return
        remaining = [len(buffers)]
        lock = threading.Lock()

        def one_released() -> None:  # refers to no buffer: it must not keep one alive
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                callback()

        for buffer in buffers:
            buffer.when_released(one_released)

    def keep(self) -> None:
        """The holder keeps the memory (as its own arrays): run the release callbacks
        now, as they would have run had the buffers been freed.

        Raises:
            RuntimeError: the lease was handed on or ended.
        """
        self._check("keep")
        for buffer in self.buffers:
            buffer.kept()

    def __repr__(self) -> str:
        state = "held" if self._held else "handed on"
        return f"Lease({len(self.buffers)} buffer(s), {state})"


def tensor_with_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[memoryview, NDArray]:
    """A new tensor (the ``.npy`` bytes of a C-ordered array of ``shape`` and ``dtype``)
    and that array, writable, inside it: for a sender that computes an array only to
    send it, which then needs no encoding copy. The tensor (read-only) shows what is
    written to the array: fill the array before handing the tensor on.
    """
    header = _npy_header(np.broadcast_to(np.zeros((), dtype), shape), fortran=False)
    # np.empty, not bytearray: the values are not zeroed first (a pass over them saved)
    blob = np.empty(len(header) + math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    blob[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    array = blob[len(header) :].view(dtype).reshape(shape)
    return blob.data.toreadonly(), array


def ndarray_to_tensor(ndarray: NDArray) -> bytes | memoryview:
    """:func:`ndarray_to_bytes`, without the copy when ``ndarray`` still sits in its
    ``.npy`` blob in a :class:`ReceivedBuffer` (the bytes before it are exactly the
    header this array would get): the tensor is then a read-only view of that blob and
    ``ndarray`` becomes read-only, so the tensor cannot change under its readers.
    """
    ndarray = as_ndarray(ndarray)
    root = received_buffer_of(ndarray)
    if root is None or not ndarray.flags.c_contiguous or ndarray.dtype.hasobject:
        return ndarray_to_sendable(ndarray)
    start = ndarray.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    header = _npy_header(ndarray, fortran=False)
    begin, end = start - len(header), start + ndarray.nbytes
    memory = root.data
    if begin < 0 or end > len(memory) or memory[begin:start] != header:
        return ndarray_to_sendable(ndarray)
    ndarray.flags.writeable = False
    return memory[begin:end].toreadonly()


def npy_placed(shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray:
    """A writable, uninitialized C-order array that sits in its own ``.npy`` blob (in a
    :class:`ReceivedBuffer`, pooled when large): :func:`ndarray_to_tensor` of it is that
    blob, without a copy. For results computed to be sent (a new global model)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        return np.empty(shape, dtype=dtype)
    header = _npy_header(np.broadcast_to(np.zeros((), dtype=dtype), shape), fortran=False)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = ReceivedBuffer.allocate(len(header) + nbytes)
    buffer[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    # A plain ndarray over the buffer: the buffer stays its base (received_buffer_of).
    return buffer.view(np.ndarray)[len(header) :].view(dtype).reshape(shape)


def ndarray_to_sendable(ndarray: NDArray, pool: BufferPool | None = None) -> bytes | memoryview:
    """:func:`ndarray_to_bytes` for a tensor that is only sent (or decoded as views): an
    array of :data:`POOLED_FROM` bytes or more is written into memory of ``pool``
    (default: :data:`RECEIVE_POOL`) and the tensor is a read-only view of it, which goes
    back to the pool once dropped; the next round's tensor then lands in memory already
    mapped instead of growing the heap.
    """
    small = not isinstance(ndarray, np.ndarray) or ndarray.nbytes < POOLED_FROM
    if small or ndarray.dtype.hasobject:
        return ndarray_to_bytes(ndarray)  # which also refuses what cannot be sent
    fortran = not ndarray.flags.c_contiguous and ndarray.flags.f_contiguous
    data = ndarray.T if fortran else ndarray
    header = _npy_header(ndarray, fortran)
    buffer = ReceivedBuffer.allocate(len(header) + ndarray.nbytes, pool)
    buffer[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    np.copyto(buffer[len(header) :].view(ndarray.dtype).reshape(data.shape), data)
    buffer.flags.writeable = False  # never a writable alias: it is nobody's received message
    return buffer.data


def pooled_parameters(parameters: Parameters) -> Parameters:
    """``parameters`` with each tensor of :data:`POOLED_FROM` bytes or more that is not
    already in a :class:`ReceivedBuffer` copied into pooled, read-only memory.

    For a model that is replaced round after round (the server's global model): the
    memory of the model a round replaces then goes back to the pool and serves the next
    messages, instead of staying behind as a hole in the heap.
    """
    tensors: list[bytes | memoryview] = []
    for tensor in parameters.tensors:
        if len(tensor) < POOLED_FROM or (
            received_buffer_of(np.frombuffer(tensor, np.uint8)) is not None
        ):
            tensors.append(tensor)
            continue
        buffer = ReceivedBuffer.allocate(len(tensor))
        buffer[:] = np.frombuffer(tensor, dtype=np.uint8)
        buffer.flags.writeable = False
        tensors.append(buffer.data)
    return Parameters(tensors=tensors, tensor_type=parameters.tensor_type)


def _header_prefix(tensor: bytes | memoryview) -> bytes:
    """The magic and header of a ``.npy`` blob (copied alone, not the data after it)."""
    head = bytes(tensor[:12])
    if len(head) >= 10 and head[6] == 1:
        return bytes(tensor[: 10 + int.from_bytes(head[8:10], "little")])
    if len(head) >= 12 and head[6] in (2, 3):
        return bytes(tensor[: 12 + int.from_bytes(head[8:12], "little")])
    return head  # not a format we read: read_magic says what is wrong


_SIMPLE_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=]?[a-zA-Z][a-zA-Z0-9]*)', "
    r"'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>(?:\d+, )*\d*|\d+,)\), \} *\n"
)
"""The header NumPy writes for a plain dtype, read without ``ast`` (CPython 3.11.0-3.11.7
and 3.12.0-3.12.1 can fail ``ast.parse`` when threads parse at once: gh-106905)."""


@functools.lru_cache(maxsize=256)
def _read_simple_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int] | None:
    """A version 1.0 header of a plain dtype, or None for anything else.

    Cached: a round's results repeat the same few headers (one per layer) node after node.
    """
    if prefix[:8] != b"\x93NUMPY\x01\x00":
        return None
    try:
        match = _SIMPLE_HEADER.fullmatch(prefix[10:].decode("latin-1"))
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        return None
    if match is None:
        return None
    shape = tuple(int(n) for n in match["shape"].replace(",", " ").split())
    dtype = np.dtype(match["descr"])
    return shape, match["fortran"] == "True", dtype, len(prefix)


def _read_header(tensor: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Parse and check a ``.npy`` header: (shape, fortran_order, dtype, data offset)."""
    prefix = _header_prefix(tensor)
    simple = _read_simple_header(prefix)
    if simple is not None:
        if simple[2].hasobject:
            raise ValueError(f"dtype {simple[2]} holds Python objects (would need pickle)")
        return simple
    with PARSE_LOCK:  # NumPy's parser uses ast: one parse at a time (see _ast_guard)
        return _read_header_with_numpy(prefix)


def _read_header_with_numpy(
    prefix: bytes,
) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    stream = io.BytesIO(prefix)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects (would need pickle)")
    return shape, fortran, dtype, stream.tell()


def _view(tensor: bytes | memoryview) -> NDArray:
    """The array of a ``.npy`` blob as a view over its bytes, after the header checks."""
    shape, fortran, dtype, offset = _read_header(tensor)
    count = math.prod(shape)
    if count * dtype.itemsize != len(tensor) - offset:
        raise ValueError(
            f"header says {shape} of {dtype} ({count * dtype.itemsize} bytes), "
            f"the data has {len(tensor) - offset} bytes"
        )
    flat = np.frombuffer(tensor, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


_copies_on_write: list[Callable[[NDArray], NDArray | None]] = []


def copy_on_write_with(provider: Callable[[NDArray], NDArray | None]) -> None:
    """Have :func:`bytes_to_ndarray` ask ``provider`` for the new array of a tensor before
    copying it: ``provider(view)`` returns a writable array equal to the read-only
    ``view`` that no write can make differ from the tensor, or None. The server's spill
    files provide one (:func:`stamen.server.spill.copy_on_write`)."""
    _copies_on_write.append(provider)


def bytes_to_ndarray(tensor: bytes | memoryview) -> NDArray:
    """Deserialize ``.npy`` bytes (never unpickling) into a new, writable array.

    The header is checked before anything is allocated: its shape and dtype must account
    for exactly the bytes that follow, so a forged header cannot make us allocate more
    than the message holds. A large tensor of a result waiting in a server's spill file
    is not copied: the array is a copy-on-write mapping of the file
    (:func:`stamen.server.spill.copy_on_write`), new and writable all the same.

    Raises:
        DecodeError: the bytes are not a valid ``.npy`` blob of a non-object dtype.
    """
    try:
        view = _view(tensor)
    except Exception as exc:  # numpy's header parser raises many kinds: all mean bad bytes
        raise DecodeError(
            f"tensor of {len(tensor)} bytes is not a valid .npy array: {exc}"
        ) from exc
    for provider in _copies_on_write:
        if (array := provider(view)) is not None:
            return array
    return view.copy(order="K")


def bytes_to_ndarray_view(tensor: bytes | memoryview) -> NDArray:
    """The array of ``.npy`` bytes as a read-only view over ``tensor``: no copy.

    The same checks as :func:`bytes_to_ndarray`. The view keeps ``tensor`` alive as long
    as it lives, and its data may be unaligned if ``tensor`` is; it cannot be written.

    Raises:
        DecodeError: the bytes are not a valid ``.npy`` blob of a non-object dtype.
    """
    try:
        array = _view(tensor)
    except Exception as exc:  # numpy's header parser raises many kinds: all mean bad bytes
        raise DecodeError(
            f"tensor of {len(tensor)} bytes is not a valid .npy array: {exc}"
        ) from exc
    array.flags.writeable = False  # already so over bytes; also over a writable buffer
    return array


def ndarrays_to_parameters(
    ndarrays: Iterable[NDArray], *, into: BufferPool | None = None
) -> Parameters:
    """Convert a list of arrays to :class:`Parameters` (``tensor_type="numpy.ndarray"``).

    Args:
        ndarrays: The arrays (as in Flower, a bare array is taken as its rows, and each
            item may be any array-like: a NumPy scalar, a number, a list of lists).
        into: For Parameters that are only sent (the node's own reply): large tensors are
            then read-only memoryviews over memory of this pool
            (:func:`ndarray_to_sendable`). Default: every tensor is ``bytes``.
    """
    if into is None:
        return Parameters(tensors=[ndarray_to_bytes(a) for a in ndarrays], tensor_type=TENSOR_TYPE)
    tensors = [ndarray_to_sendable(a, into) for a in ndarrays]
    return Parameters(tensors=tensors, tensor_type=TENSOR_TYPE)


def parameters_to_ndarrays(parameters: Parameters, *, lease: Lease | None = None) -> NDArrays:
    """Convert :class:`Parameters` back to a list of new, writable arrays (copies).

    Args:
        parameters: The tensors to decode.
        lease: The caller's lease on the message ``parameters`` was decoded from (the
            node, handing a received instruction to its NumPyClient): tensors that lie
            in a buffer it names become writable arrays over that memory instead of
            copies; writing to them changes the tensors.

    Raises:
        DecodeError: ``tensor_type`` is not ``"numpy.ndarray"`` (an empty one is accepted
            for empty parameters) or a tensor is not valid ``.npy`` bytes.
        RuntimeError: ``lease`` was handed on or ended.
    """
    _check_tensor_type(parameters)
    if lease is None:
        return [bytes_to_ndarray(t) for t in parameters.tensors]
    arrays: NDArrays = []
    for tensor in parameters.tensors:
        view = bytes_to_ndarray_view(tensor)
        alias = lease.alias(view)
        arrays.append(view.copy(order="K") if alias is None else alias)
    return arrays


def _check_tensor_type(parameters: Parameters) -> None:
    if parameters.tensor_type not in (TENSOR_TYPE, ""):
        raise DecodeError(
            f"Parameters.tensor_type: expected {TENSOR_TYPE!r}, received {parameters.tensor_type!r}"
        )


def parameters_to_views(parameters: Parameters) -> NDArrays:
    """Read-only views of the arrays of :class:`Parameters`, without copying their data.

    For code that only reads the arrays (aggregation, checks): each view shares the
    memory of its tensor, so decoding costs only the header checks of
    :func:`parameters_to_ndarrays`, whatever the model's size. The views keep the tensors
    alive. Use :func:`parameters_to_ndarrays` for arrays to modify.

    Raises:
        DecodeError: as :func:`parameters_to_ndarrays`.
    """
    _check_tensor_type(parameters)
    return [bytes_to_ndarray_view(t) for t in parameters.tensors]
