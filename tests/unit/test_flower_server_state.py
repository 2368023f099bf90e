"""Flower 1.12's Fleet API as transitions of the fleet state (protocol/flower_server), on a
fake clock: no socket, no event loop, no wall-clock wait."""

from __future__ import annotations

from typing import Any

import pytest

from stamen.errors import ClientAppError, ConnectionLost, DecodeError
from stamen.messages import (
    Code,
    DisconnectRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Instruction,
    Parameters,
    ReconnectIns,
    Reply,
    Status,
)
from stamen.protocol.fleet import ErrorKind, FleetError
from stamen.protocol.fleet_server import AwaitTask, Caller, FleetState, FleetTiming
from stamen.protocol.flower_fleet import (
    RECONNECT,
    TRAIN,
    CreateNodeRequest,
    CreateNodeResponse,
    DeleteNodeRequest,
    FlowerError,
    GetFabRequest,
    GetRunRequest,
    GetRunResponse,
    Node,
    PingRequest,
    PingResponse,
    PullTaskInsRequest,
    PushTaskResRequest,
    PushTaskResResponse,
    ReconnectTask,
    TaskIns,
    TaskMeta,
    TaskRes,
    UnreadableTask,
)
from stamen.protocol.flower_server import (
    CLOCK_SKEW_MARGIN,
    FLOWER_TRANSITIONS,
    FlowerLink,
    FlowerRespond,
    silence_limit_for,
)
from stamen.protocol.mailbox import Task
from stamen.testing import FakeClock
from stamen.wire import FRAMING, FlowerCall
from stamen.wire import flower_codec as codec

GRPC = Caller("grpc-rere", "127.0.0.1:5000")
RUN_ID = 77
NOW = 1_700_000_000.0


class Outcomes:
    """Posts instructions to a node's mailbox and keeps how each task ended."""

    def __init__(self) -> None:
        self.done: dict[int, Reply | BaseException] = {}

    def post(self, state: FleetState, cid: str, instruction: Instruction) -> int:
        node = state.get(cid)
        assert node is not None
        box: list[int] = []
        task_id = node.mailbox.post(
            instruction, b"", lambda outcome: self.done.__setitem__(box[0], outcome)
        )  # type: ignore[arg-type]
        box.append(task_id)
        return task_id


def _link(clock: FakeClock) -> FlowerLink:
    state = FleetState(
        clock=clock,
        framing=FRAMING,
        max_message_length=1 << 20,
        timing=FleetTiming(heartbeat_interval=2.0, poll_timeout=4.0),
        new_node_id=iter(range(501, 600)).__next__,
    )
    ids = iter(f"task-{n}" for n in range(1, 100))
    return FlowerLink(state, run_id=RUN_ID, new_task_id=ids.__next__)


def _respond(step: Any) -> Any:
    assert isinstance(step, FlowerRespond), step
    return step.response


def _register(link: FlowerLink, caller: Caller = GRPC, ping_interval: float = 30.0) -> int:
    response = _respond(link.request("CREATE_NODE", CreateNodeRequest(ping_interval), caller))
    assert isinstance(response, CreateNodeResponse)
    return response.node.node_id


def _take(link: FlowerLink, node_id: int) -> tuple[Any, Task]:
    step = link.request("PULL_TASK_INS", PullTaskInsRequest(Node(node_id)), GRPC)
    assert isinstance(step, AwaitTask)
    task = step.node.mailbox.take()
    assert task is not None
    link.state.poll_ended(step.node)
    return step.node, task


def _fit_res(n: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), Parameters([b"x"], "custom"), n, {})


def _answer(ins: TaskIns | ReconnectTask, node_id: int, **kwargs: Any) -> TaskMeta:
    return TaskMeta(
        task_id="",
        run_id=RUN_ID,
        message_type=kwargs.get("message_type", ins.meta.message_type),
        producer=Node(node_id),
        consumer=Node(0, anonymous=True),
        ancestry=(ins.meta.task_id,),
    )


def test_the_table_serves_every_flower_call() -> None:
    assert set(FLOWER_TRANSITIONS) == {call.name for call in FlowerCall}


def test_a_flower_node_registers_as_a_pull_based_node_without_frames() -> None:
    link = _link(FakeClock())
    node_id = _register(link)
    node = link.state.get(str(node_id))
    assert node is not None
    assert node.flower and node.pull_based and not node.frames
    assert node.max_message_length == 1 << 20
    assert node.silence_limit == silence_limit_for(30.0) == 45.0


def test_a_task_goes_out_as_a_taskins_and_its_taskres_resolves_it() -> None:
    link, outcomes = _link(FakeClock()), Outcomes()
    node_id = _register(link)
    ins = FitIns(Parameters([b"a"], "custom"), {"round": 1})
    task_id = outcomes.post(link.state, str(node_id), ins)
    node, task = _take(link, node_id)
    out = link.outgoing(node, task, NOW)
    assert isinstance(out, TaskIns)
    assert out.instruction == ins
    meta = out.meta
    assert (meta.task_id, meta.run_id, meta.message_type) == ("task-1", RUN_ID, TRAIN)
    assert meta.consumer == Node(node_id) and meta.producer.anonymous
    assert meta.created_at == NOW - CLOCK_SKEW_MARGIN
    # A pull while the task is in flight (its response was lost) gets the same task id.
    assert link.outgoing(node, task, NOW + 1).meta.task_id == "task-1"
    push = PushTaskResRequest(Node(node_id), (TaskRes(_answer(out, node_id), reply=_fit_res(3)),))
    response = _respond(link.request("PUSH_TASK_RES", push, GRPC))
    assert isinstance(response, PushTaskResResponse) and list(response.results.values()) == [0]
    assert outcomes.done[task_id] == _fit_res(3)
    # The same TaskRes again is a late reply: discarded, not an error.
    _respond(link.request("PUSH_TASK_RES", push, GRPC))


def test_an_error_taskres_fails_the_task_with_clientapperror() -> None:
    link, outcomes = _link(FakeClock()), Outcomes()
    node_id = _register(link)
    task_id = outcomes.post(link.state, str(node_id), GetPropertiesIns({}))
    node, task = _take(link, node_id)
    out = link.outgoing(node, task, NOW)
    assert isinstance(out, TaskIns)
    error = FlowerError(2, "<class 'ZeroDivisionError'>:<'division by zero'>")
    push = PushTaskResRequest(Node(node_id), (TaskRes(_answer(out, node_id), error=error),))
    _respond(link.request("PUSH_TASK_RES", push, GRPC))
    failure = outcomes.done[task_id]
    assert isinstance(failure, ClientAppError)
    assert "error code 2" in str(failure) and "division by zero" in str(failure)


def test_an_unreadable_taskres_fails_the_task_and_is_refused() -> None:
    link, outcomes = _link(FakeClock()), Outcomes()
    node_id = _register(link)
    task_id = outcomes.post(link.state, str(node_id), GetPropertiesIns({}))
    node, task = _take(link, node_id)
    out = link.outgoing(node, task, NOW)
    assert isinstance(out, TaskIns)
    bad = UnreadableTask(_answer(out, node_id), "expected configs record 'x'")
    with pytest.raises(FleetError) as caught:
        link.request("PUSH_TASK_RES", PushTaskResRequest(Node(node_id), (bad,)), GRPC)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert "expected configs record 'x'" in caught.value.message
    assert isinstance(outcomes.done[task_id], DecodeError)


def test_a_taskres_of_another_node_is_refused() -> None:
    link = _link(FakeClock())
    node_id = _register(link)
    meta = TaskMeta("", RUN_ID, TRAIN, producer=Node(node_id + 1), ancestry=("task-1",))
    push = PushTaskResRequest(Node(node_id), (TaskRes(meta, reply=_fit_res(1)),))
    with pytest.raises(FleetError) as caught:
        link.request("PUSH_TASK_RES", push, GRPC)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT


def test_the_end_of_the_run_is_a_reconnect_taskins_whose_answer_closes_the_node() -> None:
    link, outcomes = _link(FakeClock()), Outcomes()
    node_id = _register(link)
    task_id = outcomes.post(link.state, str(node_id), ReconnectIns(seconds=None))
    node, task = _take(link, node_id)
    out = link.outgoing(node, task, NOW)
    assert isinstance(out, ReconnectTask)
    assert (out.meta.message_type, out.seconds) == (RECONNECT, 0)
    # What Flower's node answers: a TaskRes of type "reconnect" (unreadable as a legacy reply).
    answer = UnreadableTask(_answer(out, node_id), "task type: expected ...")
    _respond(link.request("PUSH_TASK_RES", PushTaskResRequest(Node(node_id), (answer,)), GRPC))
    assert outcomes.done[task_id] == DisconnectRes("RECONNECT")
    assert link.state.get(str(node_id)) is None
    # Its DeleteNode that follows is answered normally.
    _respond(link.request("DELETE_NODE", DeleteNodeRequest(Node(node_id)), GRPC))


def test_the_reconnect_taskins_encodes_as_flower_reads_it() -> None:
    meta = TaskMeta("t", RUN_ID, RECONNECT, consumer=Node(5))
    data = codec.encode_reconnect_pull_response(ReconnectTask(meta, 0))
    decoded = codec.decode_pull_task_ins_response(data)
    (task,) = decoded.task_ins_list
    assert isinstance(task, UnreadableTask) and task.meta.message_type == RECONNECT


def test_liveness_follows_the_nodes_own_ping_interval() -> None:
    clock = FakeClock()
    link = _link(clock)
    node_id = _register(link, ping_interval=10.0)  # silent after 15 s
    clock.advance(14.0)
    assert link.state.silent() == []
    assert _respond(link.request("PING", PingRequest(Node(node_id), 10.0), GRPC)) == PingResponse(
        True
    )
    clock.advance(14.0)
    assert link.state.silent() == []
    clock.advance(2.0)
    (silent,) = link.state.silent()
    assert silent.node_id == node_id
    # A ping announcing a longer interval extends the limit.
    _respond(link.request("PING", PingRequest(Node(node_id), 100.0), GRPC))
    clock.advance(140.0)
    assert link.state.silent() == []
    # A node long-polling is alive however long it waits.
    step = link.request("PULL_TASK_INS", PullTaskInsRequest(Node(node_id)), GRPC)
    assert isinstance(step, AwaitTask)
    clock.advance(1000.0)
    assert link.state.silent() == []
    link.state.poll_ended(step.node)


def test_silence_limits_are_clamped() -> None:
    assert silence_limit_for(0.0) == 1.0
    assert silence_limit_for(1e300) == 86400.0


def test_a_ping_of_an_unknown_node_answers_success_false() -> None:
    link = _link(FakeClock())
    assert _respond(link.request("PING", PingRequest(Node(9), 30.0), GRPC)) == PingResponse(False)


@pytest.mark.parametrize("call", ["PULL_TASK_INS", "GET_RUN", "GET_FAB"])
def test_unknown_nodes_get_not_found(call: str) -> None:
    link = _link(FakeClock())
    request = {
        "PULL_TASK_INS": PullTaskInsRequest(Node(9)),
        "GET_RUN": GetRunRequest(Node(9), RUN_ID),
        "GET_FAB": GetFabRequest(Node(9), "abc"),
    }[call]
    with pytest.raises(FleetError) as caught:
        link.request(call, request, GRPC)
    assert caught.value.kind is ErrorKind.UNKNOWN_NODE


def test_getrun_answers_a_legacy_run_and_getfab_has_nothing() -> None:
    link = _link(FakeClock())
    node_id = _register(link)
    response = _respond(link.request("GET_RUN", GetRunRequest(Node(node_id), RUN_ID), GRPC))
    assert isinstance(response, GetRunResponse)
    run = response.run
    assert (run.run_id, run.fab_id, run.fab_version, dict(run.override_config)) == (
        RUN_ID,
        "",
        "",
        {},
    )
    with pytest.raises(FleetError) as caught:
        link.request("GET_RUN", GetRunRequest(Node(node_id), RUN_ID + 1), GRPC)
    assert caught.value.kind is ErrorKind.UNKNOWN_NODE
    with pytest.raises(FleetError) as caught:
        link.request("GET_FAB", GetFabRequest(Node(node_id), "abc"), GRPC)
    assert caught.value.kind is ErrorKind.UNKNOWN_NODE
    assert "FAB" in caught.value.message


def test_a_node_of_one_key_cannot_be_driven_by_another() -> None:
    link = _link(FakeClock())
    node_id = _register(link, Caller("grpc-rere", "p", key="aaa"))
    other = Caller("grpc-rere", "p", key="bbb")
    with pytest.raises(FleetError) as caught:
        link.request("PULL_TASK_INS", PullTaskInsRequest(Node(node_id)), other)
    assert caught.value.kind is ErrorKind.UNAUTHENTICATED
    # DeleteNode by another key is ignored.
    link.request("DELETE_NODE", DeleteNodeRequest(Node(node_id)), other)
    assert link.state.get(str(node_id)) is not None


def test_stamen_nodes_are_invisible_to_flower_calls() -> None:
    link = _link(FakeClock())
    stamen = link.state.open("grpc-rere", "p", pull_based=True)
    assert stamen.frames and not stamen.flower
    with pytest.raises(FleetError):
        link.request("PULL_TASK_INS", PullTaskInsRequest(Node(stamen.node_id)), GRPC)


def test_closing_state_refuses_flower_calls() -> None:
    link = _link(FakeClock())
    node_id = _register(link)
    link.state.close_all("stopping")
    node = link.state.get(str(node_id))
    assert node is None
    with pytest.raises(FleetError) as caught:
        link.request("CREATE_NODE", CreateNodeRequest(30.0), GRPC)
    assert caught.value.kind is ErrorKind.UNAVAILABLE


def test_wrong_request_types_are_invalid_arguments() -> None:
    link = _link(FakeClock())
    with pytest.raises(FleetError) as caught:
        link.request("PING", CreateNodeRequest(1.0), GRPC)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    with pytest.raises(FleetError):
        link.request("NOPE", CreateNodeRequest(1.0), GRPC)


def test_failing_a_task_forgets_its_flower_id() -> None:
    link, outcomes = _link(FakeClock()), Outcomes()
    node_id = _register(link)
    task_id = outcomes.post(link.state, str(node_id), GetPropertiesIns({}))
    node, task = _take(link, node_id)
    link.outgoing(node, task, NOW)
    link.fail(node, task_id, ConnectionLost("x"))
    assert node.flower_tasks == {}
    assert isinstance(outcomes.done[task_id], ConnectionLost)


def test_flower_nodes_are_invisible_to_stamen_calls() -> None:
    """Stamen's Fleet calls cannot pull for, push to or delete a Flower node."""
    from stamen.protocol.fleet import PullRequest, SimpleRequest

    link = _link(FakeClock())
    node_id = _register(link)
    with pytest.raises(FleetError) as caught:
        link.state.request("PULL", PullRequest(node_id), GRPC)
    assert caught.value.kind is ErrorKind.UNKNOWN_NODE
    link.state.request("DELETE_NODE", SimpleRequest(node_id), GRPC)
    assert link.state.get(str(node_id)) is not None
