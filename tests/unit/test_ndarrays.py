"""The NumPy codec: standard ``.npy`` bytes, never pickle, DecodeError on bad input."""

from __future__ import annotations

import gc
import io
import pickle
import weakref
from typing import Any

import numpy as np
import pytest

from stamen.errors import ConfigError, DecodeError
from stamen.messages import FitIns, Parameters
from stamen.ndarrays import (
    TENSOR_TYPE,
    Lease,
    ReceivedBuffer,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarray_to_tensor,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    received_buffer_of,
    tensor_with_array,
)
from stamen.protocol.mailbox import ReplyUse
from stamen.server.fleet.handler import slot_lease
from stamen.wire import decode_instruction, encode_instruction

_STRUCTURED = np.dtype([("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")])

ARRAYS: dict[str, np.ndarray] = {
    "0-d float": np.array(3.5),
    "0-d int": np.array(-7, dtype=np.int16),
    "empty 1-d": np.zeros((0,)),
    "empty 3-d": np.zeros((3, 0, 2), dtype=np.float32),
    "float16": np.arange(5, dtype=np.float16),
    "float32": np.linspace(-1, 1, 7, dtype=np.float32),
    "float64 nan inf": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-300]),
    "int8": np.array([-128, 0, 127], dtype=np.int8),
    "int64 bounds": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]),
    "uint8": np.arange(256, dtype=np.uint8),
    "uint64 max": np.array([np.iinfo(np.uint64).max], dtype=np.uint64),
    "bool": np.array([[True, False], [False, True]]),
    "complex64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "complex128": np.array([[1 + 2j], [np.nan + 1j]]),
    "big-endian int32": np.arange(6, dtype=">i4").reshape(2, 3),
    "fortran order": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    "non-contiguous slice": np.arange(40, dtype=np.int32)[::3],
    "transposed": np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1),
    "structured": np.array([(1, (2.0, 3.0), b"abc"), (4, (5.0, 6.0), b"de")], dtype=_STRUCTURED),
    "unicode": np.array(["a", "héllo"]),
    "datetime64": np.array(["2024-01-01", "1970-01-01"], dtype="datetime64[s]"),
    "4-d": np.random.default_rng(0).standard_normal((2, 3, 1, 2)),
}


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert b.dtype == a.dtype
    assert b.shape == a.shape
    # Bitwise: NaN payloads and -0.0 survive too.
    assert b.tobytes() == a.tobytes()


@pytest.mark.parametrize("name", list(ARRAYS))
def test_round_trip(name: str) -> None:
    """bytes_to_ndarray(ndarray_to_bytes(a)) has a's dtype, shape and exact contents."""
    array = ARRAYS[name]
    _assert_same(array, bytes_to_ndarray(ndarray_to_bytes(array)))


@pytest.mark.parametrize("name", list(ARRAYS))
def test_bytes_are_a_standard_npy_file(name: str) -> None:
    """The bytes are a ``.npy`` file that plain ``np.load(allow_pickle=False)`` reads."""
    array = ARRAYS[name]
    data = ndarray_to_bytes(array)
    assert data.startswith(b"\x93NUMPY")
    _assert_same(array, np.load(io.BytesIO(data), allow_pickle=False))


def test_fortran_order_is_preserved() -> None:
    """A Fortran-ordered array comes back Fortran-ordered (the .npy header says so)."""
    array = ARRAYS["fortran order"]
    assert bytes_to_ndarray(ndarray_to_bytes(array)).flags.f_contiguous


def test_reads_bytes_written_by_np_save() -> None:
    """Bytes written by ``np.save(..., allow_pickle=False)`` (Flower's encoder) decode."""
    buffer = io.BytesIO()
    np.save(buffer, np.arange(6.0).reshape(2, 3), allow_pickle=False)
    _assert_same(np.arange(6.0).reshape(2, 3), bytes_to_ndarray(buffer.getvalue()))


@pytest.mark.parametrize(
    "array",
    [
        np.array([1, "a", None], dtype=object),
        np.empty((2, 2), dtype=object),
        np.zeros(2, dtype=[("x", "<i4"), ("o", object)]),
    ],
    ids=["mixed objects", "empty objects", "structured with an object field"],
)
def test_object_dtype_is_refused_with_a_clear_error(array: np.ndarray) -> None:
    """Arrays holding Python objects could only travel as pickle: ConfigError says so."""
    with pytest.raises(ConfigError) as info:
        ndarray_to_bytes(array)
    text = str(info.value)
    assert "object" in text.lower()
    assert "pickle" in text


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, b"raw"], ids=["list", "float", "bytes"])
def test_array_likes_are_encoded_as_np_save_encodes_them(value: Any) -> None:
    """As Flower's (np.save), an array-like is encoded as np.asarray makes it."""
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    assert ndarray_to_bytes(value) == buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage bytes, not npy",
        b"\x93NUMPY",
        b"\x93NUMPY\x01\x00\xff\xff{'descr'",
        ndarray_to_bytes(np.arange(100, dtype=np.int64))[:-8],  # truncated data
        ndarray_to_bytes(np.arange(4))[:40],  # truncated header
    ],
    ids=["empty", "garbage", "magic only", "bad header", "truncated data", "truncated header"],
)
def test_garbage_is_a_decode_error(data: bytes) -> None:
    """Bytes that are not a valid .npy array raise DecodeError, nothing else."""
    with pytest.raises(DecodeError):
        bytes_to_ndarray(data)


_UNPICKLED: list[str] = []


def _tripwire() -> str:
    _UNPICKLED.append("unpickled!")
    return "boom"


class _Tripwire:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_tripwire, ())


def test_pickled_object_array_is_a_decode_error_and_never_unpickled() -> None:
    """A .npy holding a pickled object array is refused before anything is unpickled."""
    array = np.array([_Tripwire(), 1], dtype=object)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    data = buffer.getvalue()
    assert data.startswith(b"\x93NUMPY")
    _UNPICKLED.clear()
    with pytest.raises(DecodeError):
        bytes_to_ndarray(data)
    assert _UNPICKLED == []


def test_a_bare_pickle_is_a_decode_error_and_never_unpickled() -> None:
    """Pickle bytes (np.load's fallback format) are refused without being unpickled."""
    data = pickle.dumps(_Tripwire())
    _UNPICKLED.clear()
    with pytest.raises(DecodeError):
        bytes_to_ndarray(data)
    assert _UNPICKLED == []


def test_npz_archive_is_a_decode_error() -> None:
    """A .npz archive is not one array: DecodeError."""
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(3))
    with pytest.raises(DecodeError):
        bytes_to_ndarray(buffer.getvalue())


def _header_only(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(2**40,), (2**20, 2**20), (2**62, 4)])
def test_header_claiming_a_huge_array_is_a_decode_error(shape: tuple[int, ...]) -> None:
    """A 128-byte header that claims terabytes of data is a DecodeError.

    The codec must compare the header's size with the bytes it has before allocating:
    a peer must not be able to make us allocate (or fail with MemoryError) at will.
    """
    with pytest.raises(DecodeError):
        bytes_to_ndarray(_header_only(shape))


def _with_nul_at(data: bytes, char: bytes) -> bytes:
    """``data`` with the first ``char`` of its .npy header replaced by a NUL byte."""
    position = data.index(char, 10)
    return data[:position] + b"\x00" + data[position + 1 :]


@pytest.mark.parametrize("char", [b"{", b"(", b")", b"}"])
def test_header_with_a_nul_byte_is_a_decode_error(char: bytes) -> None:
    """One corrupted header byte (a NUL) is a DecodeError, not numpy's tokenize.TokenError.

    Any other exception escapes the callers that catch DecodeError (FedAvg.aggregate_fit):
    one bad tensor from one client would crash the server's round.
    """
    data = _with_nul_at(ndarray_to_bytes(np.arange(3.0)), char)
    with pytest.raises(DecodeError):
        bytes_to_ndarray(data)


def test_ndarrays_to_parameters_and_back() -> None:
    """A list of arrays becomes Parameters(tensor_type='numpy.ndarray') and comes back."""
    arrays = [ARRAYS["float32"], ARRAYS["0-d float"], ARRAYS["structured"]]
    parameters = ndarrays_to_parameters(arrays)
    assert parameters.tensor_type == TENSOR_TYPE == "numpy.ndarray"
    assert parameters.tensors == [ndarray_to_bytes(a) for a in arrays]
    for a, b in zip(arrays, parameters_to_ndarrays(parameters), strict=True):
        _assert_same(a, b)


def test_empty_parameters() -> None:
    """No arrays round-trip; an empty tensor_type is accepted for empty Parameters."""
    assert parameters_to_ndarrays(ndarrays_to_parameters([])) == []
    assert parameters_to_ndarrays(Parameters(tensors=[], tensor_type="")) == []


@pytest.mark.parametrize("tensor_type", ["numpy.nda", "torch.Tensor", "NUMPY.NDARRAY"])
def test_tensor_type_mismatch_is_a_decode_error(tensor_type: str) -> None:
    """Parameters of another serialization are refused, naming expected and received."""
    parameters = Parameters(tensors=[ndarray_to_bytes(np.ones(2))], tensor_type=tensor_type)
    with pytest.raises(DecodeError) as info:
        parameters_to_ndarrays(parameters)
    assert "numpy.ndarray" in str(info.value)
    assert tensor_type in str(info.value)


def test_a_bad_tensor_in_parameters_is_a_decode_error() -> None:
    """One invalid tensor among valid ones makes parameters_to_ndarrays raise DecodeError."""
    parameters = Parameters(
        tensors=[ndarray_to_bytes(np.ones(2)), b"junk"], tensor_type=TENSOR_TYPE
    )
    with pytest.raises(DecodeError):
        parameters_to_ndarrays(parameters)


def test_plain_headers_are_read_without_ast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers of plain dtypes are parsed without ``ast`` (concurrent ``ast.parse`` can fail
    on CPython 3.11.0-3.11.7, gh-106905); other headers still go through NumPy's parser."""
    import ast

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ast used")

    plain = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.asfortranarray(np.ones((3, 4))),
        np.array(np.float16(2.5)),
        np.zeros((0,), dtype=np.int8),
        np.arange(4, dtype=">i4"),
    ]
    blobs = [ndarray_to_bytes(a) for a in plain]
    monkeypatch.setattr(ast, "literal_eval", refuse)
    monkeypatch.setattr(ast, "parse", refuse)
    for blob, array in zip(blobs, plain, strict=True):
        got = bytes_to_ndarray(blob)
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    monkeypatch.undo()
    structured = np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")])
    assert bytes_to_ndarray(ndarray_to_bytes(structured)).dtype == structured.dtype


# --- received buffers: the receiver's own memory -------------------------------------------


def _received(arrays: list[np.ndarray]) -> tuple[ReceivedBuffer, Parameters]:
    """``arrays`` encoded into one message, as a FrameReader would deliver it, decoded."""
    parameters = ndarrays_to_parameters(arrays)
    message = encode_instruction(FitIns(parameters, {}))
    buffer = ReceivedBuffer.allocate(len(message))
    buffer[:] = np.frombuffer(message, dtype=np.uint8)
    instruction = decode_instruction(buffer.data.toreadonly())
    assert isinstance(instruction, FitIns)
    return buffer, instruction.parameters


def test_leased_decoding_gives_writable_arrays_over_the_received_bytes() -> None:
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.eye(3))]
    buffer, parameters = _received(arrays)
    owned = parameters_to_ndarrays(parameters, lease=Lease.over(parameters.tensors))
    for got, want in zip(owned, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable
        assert received_buffer_of(got) is buffer
    owned[0] += 1  # training in place changes the received tensor, nothing else
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], arrays[0] + 1)


def test_decoding_copies_unless_the_caller_owns_a_received_buffer() -> None:
    arrays = [np.arange(6, dtype=np.float32)]
    _, parameters = _received(arrays)
    for copy in (parameters_to_ndarrays(parameters)[0], bytes_to_ndarray(parameters.tensors[0])):
        assert copy.flags.writeable and received_buffer_of(copy) is None
    over_bytes = ndarrays_to_parameters(arrays)  # bytes tensors: nothing to alias
    lease = Lease.over(over_bytes.tensors)
    assert lease.buffers == ()
    [array] = parameters_to_ndarrays(over_bytes, lease=lease)
    assert array.flags.writeable and received_buffer_of(array) is None
    assert lease.alias(np.frombuffer(over_bytes.tensors[0], dtype=np.uint8)) is None
    [copy] = parameters_to_ndarrays(parameters, lease=Lease())  # a lease on other memory
    assert received_buffer_of(copy) is None


def test_an_array_still_in_its_npy_place_becomes_a_tensor_without_a_copy() -> None:
    arrays = [np.linspace(0, 1, 9, dtype=np.float32).reshape(3, 3)]
    buffer, parameters = _received(arrays)
    [array] = parameters_to_ndarrays(parameters, lease=Lease.over(parameters.tensors))
    array *= 2
    tensor = ndarray_to_tensor(array)
    assert isinstance(tensor, memoryview) and tensor.readonly and tensor.obj is buffer
    assert bytes(tensor) == ndarray_to_bytes(arrays[0] * 2)
    assert not array.flags.writeable  # the tensor cannot change under its readers
    with pytest.raises(ValueError, match="read-only"):
        array += 1


@pytest.mark.parametrize(
    "moved",
    [
        lambda a: a[1:],  # a part of it: the bytes before are not its header
        lambda a: a.reshape(9),  # another shape than its header's
        lambda a: a.view(np.int32),  # another dtype
        lambda a: a.T,  # not C-contiguous
    ],
    ids=["slice", "reshaped", "dtype", "transposed"],
)
def test_an_array_out_of_its_npy_place_is_encoded_as_a_copy(moved: Any) -> None:
    _, parameters = _received([np.arange(9, dtype=np.float32).reshape(3, 3)])
    [array] = parameters_to_ndarrays(parameters, lease=Lease.over(parameters.tensors))
    other = moved(array)
    tensor = ndarray_to_tensor(other)
    assert isinstance(tensor, bytes)
    assert tensor == ndarray_to_bytes(other)
    assert array.flags.writeable


def test_plain_arrays_are_encoded_as_bytes() -> None:
    array = np.arange(4, dtype=np.float64)
    assert ndarray_to_tensor(array) == ndarray_to_bytes(array)
    assert array.flags.writeable


def test_release_callbacks_run_once_when_freed_or_kept() -> None:
    calls: list[str] = []
    freed = ReceivedBuffer.allocate(8)
    freed.when_released(lambda: calls.append("freed"))
    del freed
    gc.collect()
    assert calls == ["freed"]
    kept = ReceivedBuffer.allocate(8)
    kept.when_released(lambda: calls.append("kept"))
    kept.kept()
    kept.kept()
    del kept
    gc.collect()
    assert calls == ["freed", "kept"]


# --- Lease: who may write into received memory, and when it is released --------------------


def test_only_a_held_lease_on_the_buffer_grants_a_writable_alias() -> None:
    buffer = ReceivedBuffer.allocate(64)
    view = np.frombuffer(buffer.data.toreadonly(), dtype=np.float32, count=4, offset=16)
    assert not view.flags.writeable
    assert Lease().alias(view) is None  # a lease on no memory
    assert Lease([ReceivedBuffer.allocate(64)]).alias(view) is None  # on other memory
    lease = Lease([buffer])
    alias = lease.alias(view)
    assert alias is not None and alias.flags.writeable
    alias[:] = 2.5
    np.testing.assert_array_equal(view, np.full(4, 2.5, dtype=np.float32))
    lease.end()
    assert not lease.held
    with pytest.raises(RuntimeError, match="handed on or ended"):
        lease.alias(view)


def test_a_read_only_buffer_is_never_leased() -> None:
    """Tensors encoded only to be sent, or a pooled global model, are nobody's to write."""
    buffer = ReceivedBuffer.allocate(16)
    buffer.flags.writeable = False
    lease = Lease([buffer])
    assert lease.buffers == ()
    assert lease.alias(np.frombuffer(buffer.data, dtype=np.uint8)) is None


def test_transfer_hands_the_lease_on_and_invalidates_the_givers() -> None:
    buffer = ReceivedBuffer.allocate(32)
    giver = Lease([buffer, buffer])  # named once
    taker = giver.transfer()
    assert taker.held and taker.buffers == (buffer,)
    assert not giver.held and giver.buffers == ()
    for action in (giver.transfer, giver.keep, lambda: giver.when_released(lambda: None)):
        with pytest.raises(RuntimeError, match="handed on or ended"):
            action()
    assert taker.alias(np.frombuffer(buffer.data, dtype=np.uint8)) is not None


def test_release_callbacks_run_once_every_named_buffer_is_freed() -> None:
    first, second = ReceivedBuffer.allocate(8), ReceivedBuffer.allocate(8)
    lease = Lease([first, second])
    calls: list[str] = []
    lease.when_released(lambda: calls.append("released"))
    del first
    gc.collect()
    assert calls == []
    del second
    gc.collect()
    assert calls == ["released"]


def test_release_callbacks_run_at_once_when_the_holder_keeps_the_memory() -> None:
    buffer = ReceivedBuffer.allocate(8)
    lease = Lease([buffer])
    calls: list[str] = []
    lease.when_released(lambda: calls.append("released"))
    lease.keep()
    assert calls == ["released"]
    del buffer
    gc.collect()
    assert calls == ["released"]  # once
    Lease().when_released(lambda: calls.append("nothing held"))
    assert calls == ["released", "nothing held"]


def test_a_lease_does_not_keep_its_buffers_alive() -> None:
    buffer = ReceivedBuffer.allocate(8)
    lease = Lease([buffer])
    ref = weakref.ref(buffer)
    del buffer
    gc.collect()
    assert ref() is None and lease.buffers == ()


def test_the_reply_use_says_whether_a_slot_follows_the_memory() -> None:
    buffer = ReceivedBuffer.allocate(8)
    assert slot_lease(ReplyUse.KEPT, Lease([buffer])) is None  # the slot comes back now
    assert slot_lease(ReplyUse.FOLDED, Lease()) is None  # a reply that came as bytes
    received = Lease([buffer])
    held = slot_lease(ReplyUse.FOLDED, received)
    assert held is not None and held.buffers == (buffer,) and not received.held


@pytest.mark.parametrize(
    ("shape", "dtype"), [((5,), np.uint32), ((3, 4), np.float64), ((0,), np.int8)]
)
def test_an_array_written_in_its_tensor_is_what_the_tensor_decodes_to(shape, dtype):
    tensor, array = tensor_with_array(shape, np.dtype(dtype))
    array[...] = np.arange(array.size).reshape(shape)
    assert tensor.readonly
    assert bytes(tensor) == ndarray_to_bytes(array)
    assert np.array_equal(bytes_to_ndarray(tensor), array)
