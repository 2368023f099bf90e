"""Messages in frames: how a message of any size crosses a link with a message-size limit.

An encoded ``ServerMessage`` or ``ClientMessage`` is held as a :class:`Payload`: the list
of buffers it is made of (small protobuf parts and the model's tensors, not joined). A
payload larger than a frame travels as consecutive ``Frame`` messages (field 16 of
``ServerMessage``/``ClientMessage``), each carrying the total size, the offset of its data
and at most :func:`frame_size` bytes of it; each frame is one message of the transport, so
no single message is ever larger than ``grpc_max_message_length``, whatever the model's
size. The receiver writes the frames into one buffer (:class:`FrameReader`) and decodes
the whole message once it is complete.

Frames go only to peers that said they understand them (every Stamen peer; never a
Flower peer, which receives whole messages as before). The same frames travel on every
transport: as stream messages on grpc-bidi, as the message bytes of PullInstruction and
PushReply on grpc-rere and rest.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import DecodeError
from ..memory import physical_memory_bytes
from ..ndarrays import ReceivedBuffer
from ..protocol.mailbox import Trailer
from . import _fast

__all__ = [
    "FRAMES_METADATA",
    "FRAME_FIELD",
    "FRAME_SIZE",
    "FRAMING",
    "HEARTBEAT_FIELD",
    "HEARTBEAT_MESSAGE",
    "HEARTBEAT_METADATA",
    "FrameReader",
    "Payload",
    "frame_size",
    "is_frame",
    "is_heartbeat",
    "read_frame",
]

FRAME_FIELD = 16
"""Field number of ``Frame`` in ``ServerMessage`` and ``ClientMessage``."""

FRAME_SIZE = 4 << 20
"""Bytes of message data per frame (smaller when ``grpc_max_message_length`` is)."""

SHARED_FRAMES = 4
"""Frames of a payload kept for the other nodes it is being sent to at the same time.
A round sends one instruction to every node at once, frame by frame in turns (the
server's send window), so each frame is made (copied out of the model) once for all of
them, not once per node; a node more than this many frames behind makes its own. Kept
only while the payload is being sent to more than one node. The frames of one payload
are taken on one thread (the server's event loop)."""

FRAMES_METADATA = "stamen-frames"
"""grpc-bidi metadata key by which a Stamen node (request metadata) and server (initial
response metadata) say they take frames; its value is the sender's own
``grpc_max_message_length``, which the other side's frames respect."""

HEARTBEAT_METADATA = "stamen-heartbeat"
"""grpc-bidi metadata key by which a Stamen node (request metadata, value ``1``) says it
sends heartbeats while it works on an instruction, and a Stamen server (initial response
metadata, beside :data:`FRAMES_METADATA`) asks for them: its value is the server's
heartbeat interval in seconds."""

HEARTBEAT_FIELD = 17
"""Field number of the (empty) ``Heartbeat`` message in ``ClientMessage`` (a Stamen
extension outside Flower's numbers, sent only to a server that asked for heartbeats)."""

HEARTBEAT_MESSAGE = _fast.varint(HEARTBEAT_FIELD << 3 | 2) + b"\x00"
"""A ``ClientMessage`` holding only an empty ``Heartbeat`` (field 17): ``8A 01 00``."""


def is_heartbeat(data: bytes | memoryview) -> bool:
    """Whether ``data`` is exactly a heartbeat ``ClientMessage`` (:data:`HEARTBEAT_MESSAGE`)."""
    return len(data) == len(HEARTBEAT_MESSAGE) and bytes(data) == HEARTBEAT_MESSAGE


_OVERHEAD = 256
"""Bytes a frame's tags, sizes and the Fleet request around it add, at most."""

_FRAME_TAG = _fast.varint(FRAME_FIELD << 3 | 2)


def frame_size(max_message_length: int) -> int:
    """Data bytes per frame on a link whose messages are bounded by ``max_message_length``."""
    return max(1, min(FRAME_SIZE, max_message_length - _OVERHEAD))


class TensorPart:
    """A part of a :class:`Payload` that is tensor ``index`` of a ``Parameters`` object,
    looked up each time it is read: a model moved to disk in place (its tensors swapped
    for views of the same bytes in a file, ``SpillStore.park``) is then read from there,
    and the memory it was in is not held by the payload."""

    __slots__ = ("index", "parameters", "size")

    def __init__(self, parameters: Any, index: int) -> None:
        self.parameters = parameters
        self.index = index
        self.size = memoryview(parameters.tensors[index]).nbytes

    def __len__(self) -> int:
        return self.size

    def view(self) -> bytes | memoryview:
        """The tensor's bytes as they are now (always :attr:`size` of them).

        Raises:
            RuntimeError: the tensor was replaced by one of another size.
        """
        tensor = self.parameters.tensors[self.index]
        view = tensor if isinstance(tensor, bytes) else memoryview(tensor).cast("B")
        if len(view) != self.size:
            raise RuntimeError(
                f"tensor {self.index} of a payload changed size: {self.size} -> {len(view)} bytes"
            )
        return view


def _bytes_of(part: bytes | memoryview | TensorPart) -> bytes | memoryview:
    return part.view() if isinstance(part, TensorPart) else part


class Payload:
    """An encoded message as the buffers it is made of (nothing copied until it is sent).

    A payload is immutable and may go to many nodes at once (the same instruction for a
    whole round): :meth:`frame` only reads it. Its tensor parts may be
    :class:`TensorPart`: the same bytes, wherever they lie when read.
    """

    __slots__ = ("_ends", "_joined", "_parts", "_senders", "_shared", "size")

    def __init__(self, parts: Sequence[bytes | memoryview | TensorPart]) -> None:
        self._parts: list[bytes | memoryview | TensorPart] = [
            p if isinstance(p, bytes | TensorPart) else memoryview(p).cast("B") for p in parts
        ]
        self._ends: list[int] = []
        size = 0
        for part in self._parts:
            size += len(part)
            self._ends.append(size)
        self.size = size
        self._joined: bytes | None = None
        self._shared: dict[tuple[int, int], bytes] = {}
        self._senders = 0

    @classmethod
    def of(cls, data: bytes) -> Payload:
        """A payload of one buffer."""
        payload = cls([data])
        payload._joined = data
        return payload

    def __len__(self) -> int:
        return self.size

    def followed_by(self, part: bytes) -> Payload:
        """A new payload: this one's buffers (not copied), then ``part``."""
        return Payload([*self._parts, part])

    def tobytes(self) -> bytes:
        """The whole message as one ``bytes`` (one copy, kept for the next caller)."""
        if self._joined is None:
            self._joined = b"".join(_bytes_of(p) for p in self._parts)
        return self._joined

    def _slices(self, start: int, stop: int) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        index = bisect.bisect_right(self._ends, start)
        while start < stop:
            part = _bytes_of(self._parts[index])
            part_start = self._ends[index] - len(part)
            lo, hi = start - part_start, min(len(part), stop - part_start)
            out.append(part if lo == 0 and hi == len(part) else memoryview(part)[lo:hi])
            start += hi - lo
            index += 1
        return out

    def frame(self, offset: int, size: int) -> bytes:
        """The encoded ``Frame`` message holding ``size`` bytes from ``offset`` (one copy)."""
        return b"".join(self._frame_parts(offset, size))

    def frame_payload(self, offset: int, size: int) -> Payload:
        """:meth:`frame` as a payload of views (nothing copied): for a message that
        carries the frame, joined once with it."""
        return Payload(self._frame_parts(offset, size))

    def preceded_by(self, part: bytes) -> Payload:
        """A new payload: ``part``, then this one's buffers (not copied)."""
        return Payload([part, *self._parts])

    def _frame_parts(self, offset: int, size: int) -> list[bytes | memoryview]:
        stop = min(self.size, offset + size)
        if not 0 <= offset < stop:
            raise ValueError(f"frame offset {offset} outside a payload of {self.size} bytes")
        head = (
            _fast.varint(1 << 3)
            + _fast.varint(self.size)
            + _fast.varint(2 << 3)
            + _fast.varint(offset)
            + _fast.length_delimited(3, stop - offset)
        )
        inner = len(head) + stop - offset
        return [_FRAME_TAG, _fast.varint(inner), head, *self._slices(offset, stop)]

    def messages(
        self, size: int, frame: int | None = None, trailer: Trailer | None = None
    ) -> Iterator[bytes]:
        """What to send: the whole message if it fits in ``size`` bytes, else its frames
        of ``frame`` bytes (at most ``size``; default ``size``). With ``trailer``, each
        message is followed by ``trailer(its parts)``, joined with it in one copy (a
        session's MAC: :meth:`~stamen.protocol.auth.StreamSession.trailer`); messages are
        made one at a time, in order, as they are taken."""
        if self.size <= size:
            if trailer is None:
                yield self.tobytes()
            else:
                parts = [_bytes_of(p) for p in self._parts]
                yield b"".join([*parts, trailer(parts)])
            return
        step = size if frame is None else max(1, min(frame, size))
        if trailer is not None:  # sealed for one node: nothing to share
            for offset in range(0, self.size, step):
                parts = self._frame_parts(offset, step)
                yield b"".join([*parts, trailer(parts)])
            return
        self._senders += 1
        try:
            for offset in range(0, self.size, step):
                yield self._shared_frame(offset, step)
        finally:
            self._senders -= 1
            if not self._senders:
                self._shared.clear()

    def _shared_frame(self, offset: int, step: int) -> bytes:
        """The frame at ``offset``, made once for the nodes being sent this payload at
        the same time (see :data:`SHARED_FRAMES`)."""
        made = self._shared.get((offset, step))
        if made is None:
            made = self.frame(offset, step)
            if self._senders > 1:  # another node may want it: keep it for a while
                self._shared[(offset, step)] = made
                for key in [k for k in self._shared if k[0] <= offset - SHARED_FRAMES * step]:
                    del self._shared[key]
        return made


def is_frame(data: bytes | memoryview) -> bool:
    """Whether ``data`` is a ``Frame`` message (by its first tag; not validated)."""
    return memoryview(data)[: len(_FRAME_TAG)] == _FRAME_TAG


def read_frame(data: bytes | memoryview) -> tuple[int, int, memoryview] | None:
    """``(total_size, offset, data)`` if ``data`` is a ``Frame`` message, else None.

    Raises:
        DecodeError: a frame that is malformed or inconsistent.
    """
    view = memoryview(data)
    if not is_frame(view):
        return None
    top = list(_fast.split_fields(view, 0, len(view)))
    if len(top) != 1:
        raise DecodeError(f"a Frame must be the only field of its message, found {len(top)}")
    _, wire, _, start, end = top[0]
    if wire != 2:
        raise DecodeError(f"Frame: expected a length-delimited field, received wire type {wire}")
    total = offset = 0
    chunk: memoryview | None = None
    for field, wire, _, value_start, value_end in _fast.split_fields(view, start, end):
        if field in (1, 2) and wire == 0:
            value, _ = _fast.read_varint(view, value_start, value_end)
            if field == 1:
                total = value
            else:
                offset = value
        elif field == 3 and wire == 2:
            chunk = view[value_start:value_end]
        else:
            raise DecodeError(f"Frame: unexpected field {field} (wire type {wire})")
    if chunk is None or not chunk:
        raise DecodeError("Frame: no data")
    if offset + len(chunk) > total:
        raise DecodeError(
            f"Frame: {len(chunk)} bytes at offset {offset} overrun the message's total size {total}"
        )
    return total, offset, chunk


class FrameReader:
    """Puts the frames of one link's incoming messages back together, in order.

    :meth:`feed` takes each received message and returns a whole message when there is
    one: a message that is not a frame at once, a framed one with its last frame. A frame
    sent again (a retried request) is ignored; a gap, an overrun, a size that changes
    within a message, a size over ``max_total`` or a frame under ``min_frame`` (but the
    last) is a :class:`~stamen.errors.DecodeError`.

    Args:
        max_total: Largest message a frame header may announce (None: the machine's
            memory). A receiver that knows what it expects (the server, from the
            instruction it sent) bounds it tighter with :meth:`bound`.
        min_frame: Fewest data bytes a frame other than a message's last may carry (0:
            any). Tiny frames cost a message each for a byte each.
    """

    def __init__(self, max_total: int | None = None, min_frame: int = 0) -> None:
        self.max_total = max_total
        self.min_frame = min_frame
        self.allocate: Callable[[int], ReceivedBuffer] | None = None
        self._buffer: ReceivedBuffer | None = None
        self._total = 0
        self.received = 0
        """Bytes received of the message being put together (0: none in progress)."""

    @property
    def in_progress(self) -> bool:
        """True while a framed message is incomplete."""
        return self._buffer is not None

    def bound(
        self,
        max_total: int | None,
        min_frame: int = 0,
        allocate: Callable[[int], ReceivedBuffer] | None = None,
    ) -> None:
        """Bound the next messages: their announced size and their frames' (see the
        class); a message in progress keeps the buffer it has. ``allocate(size)`` gives
        the buffer the next message is written into (default:
        :meth:`ReceivedBuffer.allocate`; the server passes a spill file's for results
        that wait on disk)."""
        self.max_total = max_total
        self.min_frame = min_frame
        self.allocate = allocate

    def reset(self) -> None:
        """Drop a partial message (its sender gave it up)."""
        self._buffer = None
        self._total = self.received = 0

    def feed(self, data: bytes | memoryview) -> bytes | memoryview | None:
        """Take one received message; return a whole message, or None for more frames.

        Raises:
            DecodeError: malformed or out-of-order frames (the partial message is dropped).
        """
        frame = read_frame(data)
        if frame is None:
            if self._buffer is not None:
                self.reset()
                raise DecodeError(
                    f"expected the frame at offset {self.received} of a {self._total}-byte "
                    "message, received a whole message"
                )
            return data
        total, offset, chunk = frame
        try:
            return self._add(total, offset, chunk)
        except DecodeError:
            self.reset()
            raise

    def _add(self, total: int, offset: int, chunk: memoryview) -> memoryview | None:
        if self._buffer is None:
            if offset != 0:
                raise DecodeError(f"expected the first frame (offset 0), received offset {offset}")
            if total > physical_memory_bytes():
                raise DecodeError(
                    f"a message of {total} bytes announced: more than this machine's "
                    f"{physical_memory_bytes()} bytes of memory"
                )
            if self.max_total is not None and total > self.max_total:
                raise DecodeError(
                    f"a message of {total} bytes announced: over the {self.max_total} "
                    "bytes expected here"
                )
            self._buffer = (self.allocate or ReceivedBuffer.allocate)(total)
            self._total = total
        if total != self._total:
            raise DecodeError(
                f"frame says the message has {total} bytes, earlier frames said {self._total}"
            )
        end = offset + len(chunk)
        if end <= self.received:
            return None  # sent again after a lost response: already have it
        if offset != self.received:
            raise DecodeError(f"expected the frame at offset {self.received}, received {offset}")
        if end < total and len(chunk) < self.min_frame:
            raise DecodeError(
                f"a frame of {len(chunk)} bytes at offset {offset}: frames but the last "
                f"carry at least {self.min_frame} bytes"
            )
        assert self._buffer is not None
        self._buffer = self._buffer.land(offset, chunk)  # a spill file's may move to memory
        self.received = end
        if end < total:
            return None
        whole = self._buffer.data.toreadonly()
        self._buffer = None
        self._total = self.received = 0
        return whole


class Framing:
    """Stamen's frames, as the sans-IO fleet state sees them
    (:class:`stamen.protocol.fleet_server.Framing`)."""

    def reader(self) -> FrameReader:
        """A fresh reader for one node's replies."""
        return FrameReader()

    def is_frame(self, data: bytes | memoryview) -> bool:
        """Whether ``data`` is a ``Frame`` message."""
        return is_frame(data)

    def frame_size(self, max_message_length: int) -> int:
        """Data bytes per frame on a link bounded by ``max_message_length``."""
        return frame_size(max_message_length)

    def offset(self, data: bytes | memoryview) -> int | None:
        """Where in its message the frame ``data`` starts; None if ``data`` is not a
        well-formed frame."""
        try:
            frame = read_frame(data)
        except DecodeError:
            return None
        return None if frame is None else frame[1]


FRAMING = Framing()
