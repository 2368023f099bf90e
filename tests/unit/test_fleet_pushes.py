"""A grpc-rere or rest node pushes a large reply's frames a few at a time.

The node side of :data:`stamen.transport.fleet.PUSHES_IN_FLIGHT`, over a requester that
records what is in flight; the server side (frames that overtake an earlier one wait for
it) is in ``test_fleet_state.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from stamen.errors import ProtocolError
from stamen.messages import Code, FitIns, FitRes, Parameters, Status
from stamen.protocol.fleet import CreateNodeResponse, PullResponse
from stamen.transport import fleet
from stamen.transport.fleet import FleetClientTransport
from stamen.wire import FRAMING, FrameReader, Verb, encode_instruction_payload, fleet_codec
from stamen.wire.codec import decode_reply

WAIT = 10.0
MAX_MESSAGE = 4096


class _Server:
    """A Fleet server in a requester: registers the node, hands it one instruction, and
    takes pushes, counting those in flight. Pushes at the offsets in ``together`` must be
    in flight at the same time (else their barrier breaks and the push fails); the push
    at ``fail_at`` is refused."""

    def __init__(self, *, together: tuple[int, int] | None = None, fail_at: int | None = None):
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.first_alone: bool | None = None
        self.pushed: list[bytes] = []
        self.after_failure = 0
        self.failed = threading.Event()
        self.together = together
        self.barrier = threading.Barrier(2, timeout=WAIT)
        self.fail_at = fail_at
        instruction = FitIns(Parameters([b"\x00" * 16], "numpy.ndarray"), {})
        self.instruction = encode_instruction_payload(instruction).tobytes()

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        if verb is Verb.CREATE_NODE:
            response = CreateNodeResponse(7, 60.0, 1.0, MAX_MESSAGE)
            return fleet_codec.encode_create_node_response(response)
        if verb is Verb.PULL:
            return fleet_codec.encode_pull_response(PullResponse(11, self.instruction))
        if verb is Verb.PUSH:
            return self._push(body)
        return fleet_codec.encode_empty()

    def _push(self, body: bytes) -> bytes:
        message = bytes(fleet_codec.decode_push_request(body).client_message)
        offset = FRAMING.offset(message)
        assert offset is not None
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if offset == 0:
                self.first_alone = self.inside == 1
            if self.failed.is_set():
                self.after_failure += 1
        try:
            if self.together is not None and offset in self.together:
                self.barrier.wait()  # both in flight at once, or BrokenBarrierError
            if offset == self.fail_at:
                self.failed.set()
                raise ProtocolError(f"frame at {offset} refused (injected)")
            with self.lock:
                self.pushed.append(message)
            return fleet_codec.encode_empty()
        finally:
            with self.lock:
                self.inside -= 1


def _reply() -> FitRes:
    values = np.arange(6_000, dtype=np.float32)
    return FitRes(Status(Code.OK, ""), Parameters([values.tobytes()], "numpy.ndarray"), 9, {})


Connect = Callable[[_Server], FleetClientTransport]


@pytest.fixture
def connected() -> Iterator[Connect]:
    """Connects a node to a :class:`_Server` and has it take the instruction."""
    transports: list[FleetClientTransport] = []

    def make(server: _Server) -> FleetClientTransport:
        transport = FleetClientTransport(server, max_message_length=MAX_MESSAGE)
        transports.append(transport)
        transport.connect()
        transport.receive()
        return transport

    yield make
    for transport in transports:
        transport.close(graceful=True)


def _offsets(frames: list[bytes]) -> list[int]:
    found = [FRAMING.offset(frame) for frame in frames]
    assert all(offset is not None for offset in found)
    return [offset for offset in found if offset is not None]


def test_frames_after_the_first_are_pushed_two_at_a_time(connected: Connect) -> None:
    """The first frame goes alone (it may wait for the server's receive slot); the others
    two at a time (their barrier passes only so); every frame goes once, and the frames
    put back together in offset order are the reply."""
    frame = fleet.FRAMING.frame_size(MAX_MESSAGE)
    server = _Server(together=(frame, 2 * frame))
    transport = connected(server)
    reply = _reply()
    transport.send(reply)
    assert server.first_alone is True
    assert server.most == fleet.PUSHES_IN_FLIGHT == 2
    offsets = _offsets(server.pushed)
    assert sorted(offsets) == list(range(0, max(offsets) + 1, frame))
    assert len(offsets) >= 5
    reader = FrameReader()
    whole = None
    for _, message in sorted(zip(offsets, server.pushed, strict=True)):
        whole = reader.feed(message)
    assert whole is not None
    got = decode_reply(whole)
    assert isinstance(got, FitRes) and got.num_examples == 9
    assert bytes(got.parameters.tensors[0]) == bytes(reply.parameters.tensors[0])


def test_a_failed_push_ends_the_reply_and_nothing_is_pushed_after(connected: Connect) -> None:
    """A push refused for good fails ``send`` with its error, once the pushes in flight
    beside it have ended: none is in flight after ``send`` returns, and no frame after
    the failed one is pushed once it has failed (beyond the one already in flight)."""
    frame = fleet.FRAMING.frame_size(MAX_MESSAGE)
    server = _Server(fail_at=2 * frame)
    transport = connected(server)
    with pytest.raises(ProtocolError, match="refused"):
        transport.send(_reply())
    with server.lock:
        assert server.inside == 0
    assert server.after_failure <= 1
    offsets = _offsets(server.pushed)
    assert 2 * frame not in offsets and max(offsets) <= 3 * frame
