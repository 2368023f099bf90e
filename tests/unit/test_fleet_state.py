"""The fleet server's sans-IO state (protocol/fleet_server, protocol/slots) on a fake clock.

Registry, liveness, long-poll assignment, reply reception and the Fleet calls' transitions
are driven here by plain calls and :class:`~stamen.testing.FakeClock`: no socket, no
event loop, no wall-clock wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stamen.errors import ConnectionLost, ProtocolError
from stamen.messages import Code, FitIns, FitRes, Parameters, Status
from stamen.protocol.fleet import (
    PROTOCOL_VERSION,
    CreateNodeRequest,
    CreateNodeResponse,
    ErrorKind,
    FleetError,
    PullRequest,
    PullResponse,
    PushRequest,
    SimpleRequest,
)
from stamen.protocol.fleet_client import FleetClientState
from stamen.protocol.fleet_server import (
    FRAMES_AHEAD,
    TRANSITIONS,
    AwaitTask,
    Caller,
    FleetState,
    FleetTiming,
    NodeRecord,
    Reception,
    Respond,
    TakeReply,
)
from stamen.protocol.slots import Admission, SlotLedger
from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet import handler
from stamen.server.fleet.handler import Fleet
from stamen.testing import FakeClock
from stamen.wire import (
    FRAMING,
    Payload,
    Verb,
    encode_instruction_payload,
    encode_reply_payload,
    fleet_codec,
)

TIMING = FleetTiming(heartbeat_interval=2.0, heartbeat_timeout=6.0, poll_timeout=4.0)
REST = Caller("rest", "127.0.0.1:5000")


def _state(clock: FakeClock, max_message_length: int = 1 << 20) -> tuple[FleetState, list[str]]:
    log: list[str] = []

    class _Events:
        def joined(self, node: NodeRecord) -> None:
            log.append(f"joined {node.cid} {node.transport}")

        def left(self, node: NodeRecord, error: BaseException | None) -> None:
            log.append(f"left {node.cid} {type(error).__name__}")

    ids = iter(range(101, 200))
    state = FleetState(
        clock=clock,
        framing=FRAMING,
        max_message_length=max_message_length,
        timing=TIMING,
        new_node_id=lambda: next(ids),
        events=_Events(),
    )
    return state, log


def _create(state: FleetState, caller: Caller = REST) -> NodeRecord:
    step = state.request("CREATE_NODE", CreateNodeRequest(), caller)
    assert isinstance(step, Respond)
    assert isinstance(step.response, CreateNodeResponse)
    node = state.get(str(step.response.node_id))
    assert node is not None
    return node


def _fit_payload(size: int) -> Payload:
    tensor = b"\x01" * size
    return encode_instruction_payload(
        FitIns(Parameters(tensors=[tensor], tensor_type="numpy.ndarray"), {})
    )


def _post(node: NodeRecord, payload: Payload) -> list[FitRes | BaseException]:
    outcomes: list[FitRes | BaseException] = []

    def done(outcome: object) -> None:
        assert isinstance(outcome, FitRes | BaseException)
        outcomes.append(outcome)

    node.mailbox.post(FitIns(Parameters([], ""), {}), payload, done)
    return outcomes


def test_every_fleet_call_has_one_transition() -> None:
    """The transition table names exactly the calls the wire defines."""
    assert set(TRANSITIONS) == {verb.name for verb in Verb}


def test_create_node_registers_a_pull_based_node_and_tells_the_timing() -> None:
    """CreateNode opens a node of the caller's transport and key and answers the timing."""
    clock = FakeClock(100.0)
    state, log = _state(clock)
    step = state.request("CREATE_NODE", CreateNodeRequest(max_message_length=5000), REST)
    assert step == Respond(CreateNodeResponse(101, 2.0, 4.0, 1 << 20))
    node = state.get("101")
    assert node is not None and node.pull_based and node.frames
    assert (node.transport, node.peer, node.key, node.last_seen) == ("rest", REST.peer, None, 100)
    assert node.max_message_length == 5000  # the node's own, smaller bound
    assert log == ["joined 101 rest"]


def test_a_silent_node_is_found_on_the_fake_clock_and_a_polling_one_is_not() -> None:
    """Liveness runs on the injected clock: silence past the heartbeat timeout marks a
    node silent; a heartbeat, or a long-poll held open, keeps it alive."""
    clock = FakeClock()
    state, _ = _state(clock)
    quiet, beating, polling = _create(state), _create(state), _create(state)
    step = state.request("PULL", PullRequest(polling.node_id), REST)
    assert isinstance(step, AwaitTask) and step.timeout == TIMING.poll_timeout
    clock.advance(5.0)
    state.request("HEARTBEAT", SimpleRequest(beating.node_id), REST)
    assert state.silent() == []
    clock.advance(1.5)  # quiet: 6.5 s > 6 s; beating: 1.5 s
    assert state.silent() == [quiet]
    clock.advance(5.0)
    assert state.silent() == [quiet, beating]
    state.poll_ended(polling)  # the poll ended now: seen now, and no longer held open
    assert polling.polls == 0 and polling.last_seen == clock.now
    assert polling not in state.silent()


def test_closing_a_node_fails_its_tasks_and_tells_the_shell() -> None:
    """close() ends pending tasks with the error, reports the node gone, and only once."""
    state, log = _state(FakeClock())
    node = _create(state)
    outcomes = _post(node, _fit_payload(10))
    assert state.close(node, ConnectionLost("gone")) is True
    assert state.close(node, ConnectionLost("again")) is False
    assert [type(o) for o in outcomes] == [ConnectionLost]
    assert log[-1] == "left 101 ConnectionLost" and state.get("101") is None


@pytest.mark.parametrize(
    ("verb", "request_", "kind"),
    [
        ("PULL", PullRequest(999), ErrorKind.UNKNOWN_NODE),
        ("HEARTBEAT", SimpleRequest(101, protocol_version=PROTOCOL_VERSION + 1), "version"),
        ("CREATE_NODE", CreateNodeRequest(protocol_version=1), "version"),
        ("PUSH", PullRequest(101), ErrorKind.INVALID_ARGUMENT),
        ("NOT_A_CALL", PullRequest(101), ErrorKind.INVALID_ARGUMENT),
    ],
)
def test_requests_that_cannot_be_served_are_refused_with_their_kind(
    verb: str, request_: object, kind: ErrorKind | str
) -> None:
    """Unknown nodes, other protocol versions, a body of the wrong call and unknown
    calls are refused, each with its own error kind."""
    state, _ = _state(FakeClock())
    _create(state)
    with pytest.raises(FleetError) as caught:
        state.request(verb, request_, REST)
    expected = ErrorKind.VERSION_MISMATCH if kind == "version" else kind
    assert caught.value.kind is expected


def test_a_node_answers_only_to_its_own_key() -> None:
    """Another key's requests for a node are refused, and cannot unregister it."""
    state, _ = _state(FakeClock())
    node = _create(state, Caller("grpc-rere", "p", key="alice"))
    mallory = Caller("grpc-rere", "p", key="mallory")
    with pytest.raises(FleetError) as caught:
        state.request("HEARTBEAT", SimpleRequest(node.node_id), mallory)
    assert caught.value.kind is ErrorKind.UNAUTHENTICATED
    assert state.request("DELETE_NODE", SimpleRequest(node.node_id), mallory) == Respond()
    assert state.get(node.cid) is node
    state.request("DELETE_NODE", SimpleRequest(node.node_id), Caller("grpc-rere", "p", "alice"))
    assert state.get(node.cid) is None


def test_a_long_poll_returns_a_small_instruction_whole_and_a_large_one_in_frames() -> None:
    """pull_response sends what fits in one frame whole; a larger instruction's first
    frame, then the rest on request by offset."""
    state, _ = _state(FakeClock(), max_message_length=4096)
    node = _create(state)
    assert state.pull_response(node, None) == PullResponse(0, b"")
    small = _fit_payload(10)
    _post(node, small)
    task = node.mailbox.take()
    assert task is not None
    assert state.pull_response(node, task) == PullResponse(task.task_id, small.tobytes())
    node.mailbox.deliver(task.task_id, FitRes(Status(Code.OK, ""), Parameters([], ""), 1, {}))
    large = _fit_payload(10_000)
    _post(node, large)
    task = node.mailbox.take()
    assert task is not None
    first = state.pull_response(node, task)
    assert first.task_id == task.task_id
    assert _joined(first.server_message) == large.frame(0, node.frame_size)
    step = state.request("PULL", PullRequest(node.node_id, task.task_id, node.frame_size), REST)
    assert isinstance(step, Respond) and isinstance(step.response, PullResponse)
    assert step.response.task_id == task.task_id
    assert _joined(step.response.server_message) == large.frame(node.frame_size, node.frame_size)


def _joined(message: Any) -> bytes:
    """A pull response's message as bytes (a frame comes as a payload of views)."""
    return bytes(message) if isinstance(message, bytes | memoryview) else message.tobytes()


def test_reception_decides_per_message() -> None:
    """Frames of an ended task are ignored, a whole late reply is checked, a large
    reply's first frame needs a slot, everything else is fed."""
    state, _ = _state(FakeClock(), max_message_length=4096)
    node = _create(state)
    frames = list(_fit_payload(10_000).messages(node.frame_size))
    assert len(frames) > 2
    assert state.reception(node, 7, frames[0]) is Reception.IGNORE  # no such task
    assert state.reception(node, 7, b"\x0a\x00") is Reception.LATE
    _post(node, _fit_payload(10))
    task = node.mailbox.take()
    assert task is not None
    assert state.reception(node, task.task_id, b"\x0a\x00") is Reception.FEED
    assert state.reception(node, task.task_id, frames[0]) is Reception.NEEDS_SLOT
    node.slot = Admission.ORDERED
    assert state.reception(node, task.task_id, frames[0]) is Reception.FEED
    assert node.reader.feed(frames[0]) is None  # now in progress
    node.slot = None
    assert state.reception(node, task.task_id, frames[1]) is Reception.FEED
    step = state.request("PUSH", PushRequest(node.node_id, task.task_id, frames[1]), REST)
    assert step == TakeReply(node, task.task_id, frames[1])


def test_a_frame_that_overtook_an_earlier_one_is_told_apart() -> None:
    """``ahead_of_turn``: a frame of a task in flight whose earlier bytes the reader does
    not have yet; never a first frame, a whole reply, a frame it has, or an ended task's."""
    state, _ = _state(FakeClock(), max_message_length=4096)
    node = _create(state)
    frames = list(_fit_payload(12_000).messages(node.frame_size))
    assert len(frames) >= 3
    assert not state.ahead_of_turn(node, 7, frames[1])  # no such task
    _post(node, _fit_payload(10))
    task = node.mailbox.take()
    assert task is not None
    tid = task.task_id
    assert not state.ahead_of_turn(node, tid, frames[0])
    assert not state.ahead_of_turn(node, tid, b"\x0a\x00")  # a whole reply
    assert state.ahead_of_turn(node, tid, frames[1]) and state.ahead_of_turn(node, tid, frames[2])
    assert state.reception(node, tid, frames[0]) is Reception.NEEDS_SLOT
    assert node.reader.feed(frames[0]) is None
    assert not state.ahead_of_turn(node, tid, frames[0])  # sent again: it has it
    assert not state.ahead_of_turn(node, tid, frames[1])
    assert state.ahead_of_turn(node, tid, frames[2])
    node.mailbox.fail(tid, ConnectionLost("gone"))
    assert not state.ahead_of_turn(node, tid, frames[2])  # ended: ignored, not waited for


def test_only_a_frame_a_few_frames_ahead_waits() -> None:
    """A frame more than ``FRAMES_AHEAD`` frames past what the reader has is no
    overtaking of concurrent pushes: it is a gap at once, not kept waiting."""
    state, _ = _state(FakeClock(), max_message_length=4096)
    node = _create(state)
    frames = list(_fit_payload(40_000).messages(node.frame_size))
    assert len(frames) > FRAMES_AHEAD + 2
    _post(node, _fit_payload(10))
    task = node.mailbox.take()
    assert task is not None
    tid = task.task_id
    assert state.ahead_of_turn(node, tid, frames[FRAMES_AHEAD])
    assert not state.ahead_of_turn(node, tid, frames[FRAMES_AHEAD + 1])
    state.reception(node, tid, frames[0])
    assert node.reader.feed(frames[0]) is None
    assert state.ahead_of_turn(node, tid, frames[FRAMES_AHEAD + 1])


def _fleet_with_node(
    loop: asyncio.AbstractEventLoop, max_message_length: int = 4096
) -> tuple[Fleet, NodeRecord]:
    fleet = Fleet(SimpleClientManager(), loop, max_message_length=max_message_length, timing=TIMING)
    body = fleet_codec.encode_create_node_request(CreateNodeRequest())
    created = loop.run_until_complete(
        fleet.handle(Verb.CREATE_NODE, body, "rest", "peer", method="m", headers={})
    )
    node = fleet.state.get(str(fleet_codec.decode_create_node_response(created).node_id))
    assert node is not None
    return fleet, node


def _push_all(
    loop: asyncio.AbstractEventLoop, fleet: Fleet, node: NodeRecord, task_id: int, frames: list[Any]
) -> list[bytes | BaseException]:
    """Push ``frames`` as concurrent requests, started in the order given."""

    async def pushes() -> list[bytes | BaseException]:
        calls = [
            fleet.handle(
                Verb.PUSH,
                fleet_codec.encode_push_request(PushRequest(node.node_id, task_id, frame)),
                "rest",
                "peer",
                method="m",
                headers={},
            )
            for frame in frames
        ]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)

    return loop.run_until_complete(pushes())


def _awaited_reply(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Fleet, NodeRecord, int, list[FitRes | BaseException], FitRes, list[Any]]:
    """A fleet whose one node has an instruction in flight: the fleet, the node, the
    task's id, where its outcome goes, a reply to it and that reply's frames."""
    fleet, node = _fleet_with_node(loop)
    outcomes = _post(node, _fit_payload(10))
    task = node.mailbox.take()
    assert task is not None
    values = np.arange(4_000, dtype=np.float32)
    reply = FitRes(Status(Code.OK, ""), Parameters([values.tobytes()], "numpy.ndarray"), 5, {})
    frames = list(encode_reply_payload(reply).messages(node.frame_size))
    return fleet, node, task.task_id, outcomes, reply, frames


def test_frames_pushed_out_of_order_are_taken_in_order(loop: asyncio.AbstractEventLoop) -> None:
    """Concurrent pushes of one reply's frames may arrive in any order (a node has a few in
    flight): each waits for the ones before it, and the reply is whole and right."""
    fleet, node, task_id, outcomes, reply, frames = _awaited_reply(loop)
    assert len(frames) >= 5
    order = [0, 3, 2, len(frames) - 1, *range(4, len(frames) - 1), 1]
    answers = _push_all(loop, fleet, node, task_id, [frames[i] for i in order])
    assert all(isinstance(answer, bytes) for answer in answers), answers
    assert len(outcomes) == 1 and isinstance(outcomes[0], FitRes)
    got = outcomes[0]
    assert got.num_examples == 5
    assert bytes(got.parameters.tensors[0]) == bytes(reply.parameters.tensors[0])
    assert not fleet._landed  # nothing left waiting


def test_a_frame_whose_earlier_one_never_comes_fails_the_reply(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame waits for its earlier ones a bounded time; then the gap is an error, as
    it was before frames could overtake each other: the push is refused, the task fails."""
    monkeypatch.setattr(handler, "_FRAME_ORDER_WAIT", 0.2)
    fleet, node, task_id, outcomes, _, frames = _awaited_reply(loop)
    began = loop.time()
    answers = _push_all(loop, fleet, node, task_id, [frames[0], frames[2]])
    assert loop.time() - began < 10
    assert isinstance(answers[0], bytes)
    assert isinstance(answers[1], FleetError) and answers[1].kind is ErrorKind.INVALID_ARGUMENT
    assert "expected the frame at offset" in str(answers[1])
    assert len(outcomes) == 1 and isinstance(outcomes[0], Exception)


def test_a_node_has_a_few_frames_waiting_at_most(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each waiting push holds its bytes of the request budget: past ``_FRAMES_WAITING``
    frames of one node waiting at once, the next is taken as it is (a gap fails the
    reply at once), and the waiting ones then find their task ended."""
    monkeypatch.setattr(handler, "_FRAME_ORDER_WAIT", 20.0)
    fleet, node, task_id, outcomes, _, frames = _awaited_reply(loop)
    pushed = [frames[1], frames[2], frames[3], frames[4], frames[2]]
    assert len(pushed) - 1 == handler._FRAMES_WAITING
    began = loop.time()
    answers = _push_all(loop, fleet, node, task_id, pushed)
    assert loop.time() - began < 10  # nobody waited out the 20 s
    assert [isinstance(a, FleetError) for a in answers] == [False] * 4 + [True]
    assert len(outcomes) == 1 and isinstance(outcomes[0], Exception)
    assert not fleet._waiting


def test_a_closing_fleet_refuses_requests() -> None:
    """After close_all, every node is gone and every call is UNAVAILABLE."""
    state, log = _state(FakeClock())
    _create(state)
    state.close_all("server stopped")
    assert len(state) == 0 and log[-1] == "left 101 ConnectionLost"
    with pytest.raises(FleetError) as caught:
        state.request("CREATE_NODE", CreateNodeRequest(), REST)
    assert caught.value.kind is ErrorKind.UNAVAILABLE


def test_slot_ledger_admits_in_instruction_order_and_after_patience() -> None:
    """A later instruction's reply waits for earlier ones, unless it waited ``patience``;
    then it takes a late slot, of which there are ``max_late``."""
    ledger = SlotLedger(1, patience=10.0)
    for seq in (1, 2, 3, 4):
        ledger.begin(seq)
    assert ledger.admit(2, waited=0.0) is None  # 1 has not ended
    assert ledger.admit(1, waited=0.0) is Admission.ORDERED
    assert ledger.admit(3, waited=9.9) is None  # no free slot, not patient yet
    assert ledger.admit(3, waited=10.0) is Admission.LATE
    assert (ledger.late, ledger.free, ledger.late_free) == (1, 0, 0)
    assert ledger.admit(4, waited=60.0) is None  # the one late slot is taken
    ledger.release(Admission.LATE)
    assert ledger.admit(4, waited=60.0) is Admission.LATE and ledger.late == 2
    ledger.release(Admission.LATE)
    ledger.release(Admission.ORDERED)
    ledger.end(1)
    ledger.end(4)
    changes = ledger.changes
    ledger.end(3)
    assert ledger.changes == changes + 1
    assert ledger.admit(2, waited=0.0) is Admission.ORDERED


def test_slot_ledger_keeps_the_turn_s_slot_from_late_replies() -> None:
    """Late replies, folded only after the reply whose turn it is, have slots of their
    own: they never hold the slot that reply needs, so the round cannot deadlock."""
    ledger = SlotLedger(1, patience=10.0)
    for seq in (1, 2, 3, 4):
        ledger.begin(seq)
    assert ledger.admit(1, waited=0.0) is Admission.ORDERED
    assert ledger.admit(3, waited=11.0) is Admission.LATE  # 2 is slow
    ledger.release(Admission.ORDERED)  # 1 folded and freed
    ledger.end(1)
    assert ledger.admit(4, waited=11.0) is None  # the late slot is 3's
    assert ledger.admit(2, waited=0.0) is Admission.ORDERED  # its turn: its own slot


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_the_shell_drops_a_silent_node_on_its_fake_clock(loop: asyncio.AbstractEventLoop) -> None:
    """The fleet shell with an injected clock drops a silent node (its proxy leaves the
    client manager) when the fake clock passes the heartbeat timeout: no wall-clock wait."""
    clock = FakeClock()
    manager = SimpleClientManager()
    fleet = Fleet(manager, loop, max_message_length=1 << 20, timing=TIMING, clock=clock)
    body = fleet_codec.encode_create_node_request(CreateNodeRequest())
    created = loop.run_until_complete(
        fleet.handle(Verb.CREATE_NODE, body, "rest", "peer", method="m", headers={})
    )
    node_id = fleet_codec.decode_create_node_response(created).node_id
    assert manager.num_available() == 1
    clock.advance(TIMING.silence_limit)
    assert fleet.drop_silent_nodes() == 0
    clock.advance(0.01)
    assert fleet.drop_silent_nodes() == 1
    assert manager.num_available() == 0 and len(fleet) == 0
    beat = fleet_codec.encode_simple_request(SimpleRequest(node_id))
    with pytest.raises(FleetError) as caught:
        loop.run_until_complete(
            fleet.handle(Verb.HEARTBEAT, beat, "rest", "peer", method="m", headers={})
        )
    assert caught.value.kind is ErrorKind.UNKNOWN_NODE


# --- the node's side --------------------------------------------------------------------


def test_the_node_state_receives_an_instruction_frame_by_frame() -> None:
    """The node asks for each next frame by the bytes it has, and is busy (heartbeats
    due) from the first frame until its reply went through."""
    client = FleetClientState(FRAMING, max_message_length=4096)
    client.registered(CreateNodeResponse(42, heartbeat_interval=1.0, poll_timeout=2.0))
    assert (client.node_id, client.pull_timeout) == (42, 17.0)
    assert client.heartbeat_request() is None  # idle: its long-poll proves it is alive
    payload = _fit_payload(10_000)
    frames = list(payload.messages(FRAMING.frame_size(4096)))
    assert client.pull_request() == PullRequest(42)
    assert client.pulled(PullResponse(0, b"")) is None  # nothing in time
    whole = None
    for index, frame in enumerate(frames):
        if index:
            request = client.pull_request()
            assert (request.task_id, request.offset) == (9, index * FRAMING.frame_size(4096))
        whole = client.pulled(PullResponse(9, frame))
        assert client.heartbeat_request() == SimpleRequest(42)
    assert whole is not None and bytes(whole) == payload.tobytes()
    pushes = list(client.push_requests(_fit_payload(10)))
    assert [(p.node_id, p.task_id) for p in pushes] == [(42, 9)]
    client.replied()
    assert client.heartbeat_request() is None
    with pytest.raises(ConnectionLost, match="without an instruction"):
        list(client.push_requests(_fit_payload(10)))


@pytest.mark.parametrize(
    "response",
    [
        CreateNodeResponse(0, 1.0, 1.0),
        CreateNodeResponse(1, float("nan"), 1.0),
        CreateNodeResponse(1, 1.0, 1e9),
        CreateNodeResponse(1, 0.001, 1.0),
    ],
)
def test_the_node_refuses_a_registration_it_cannot_work_with(response: CreateNodeResponse) -> None:
    """No node id, or timing that would spin, crash or hang the node: ProtocolError."""
    client = FleetClientState(FRAMING, max_message_length=4096)
    with pytest.raises(ProtocolError, match="CreateNode"):
        client.registered(response)


def test_a_pull_based_node_has_its_instruction_with_the_last_frame_and_may_pull_again() -> None:
    """The task says its instruction is delivered (``on_sent``) once the response holding
    its last byte is built, whole or framed, and keeps its encoding: the node may pull a
    frame again after a lost response. The encoding reads the model's tensors where they
    are then: a model moved in place (as ``SpillStore.park`` does) is sent from its new
    place, the same bytes, and the old buffer is not held."""
    state, _ = _state(FakeClock(), max_message_length=4096)
    node = _create(state)
    told: list[int] = []
    tensor = np.arange(3_000, dtype=np.float32)
    parameters = Parameters(tensors=[memoryview(tensor.tobytes())], tensor_type="numpy.ndarray")
    payload = encode_instruction_payload(FitIns(parameters, {}))
    node.mailbox.post(
        FitIns(parameters, {}), payload, lambda _: None, on_sent=lambda: told.append(1)
    )
    task = node.mailbox.take()
    assert task is not None
    frames = [_joined(state.pull_response(node, task).server_message)]
    offset = node.frame_size
    while offset < len(payload):
        assert told == []
        step = state.request("PULL", PullRequest(node.node_id, task.task_id, offset), REST)
        assert isinstance(step, Respond) and isinstance(step.response, PullResponse)
        frames.append(_joined(step.response.server_message))
        offset += node.frame_size
    assert told == [1] and len(frames) > 2
    assert task.payload is payload  # kept for a pull that comes again
    # The model moves: its tensor swapped in place for a copy elsewhere.
    old = parameters.tensors[0]
    moved = bytearray(bytes(old))
    parameters.tensors[0] = memoryview(moved)
    old.release()  # the old buffer can go: the payload does not hold it
    again = state.request("PULL", PullRequest(node.node_id, task.task_id, node.frame_size), REST)
    assert isinstance(again, Respond) and isinstance(again.response, PullResponse)
    assert _joined(again.response.server_message) == frames[1]
    moved[-1] ^= 0xFF  # read from the new place: a change there shows in the last frame
    last = (len(frames) - 1) * node.frame_size
    step = state.request("PULL", PullRequest(node.node_id, task.task_id, last), REST)
    assert isinstance(step, Respond) and isinstance(step.response, PullResponse)
    assert _joined(step.response.server_message) != frames[-1]
    assert told == [1]  # said once
