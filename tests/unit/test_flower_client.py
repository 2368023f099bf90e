"""The node's Flower Fleet session (sans-IO) and protocol detection, without sockets."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from stamen.errors import ConfigError, ConnectionLost, NodeUnknown, ProtocolError
from stamen.messages import Code, FitIns, FitRes, Parameters, Status
from stamen.protocol.flower_client import (
    POLL_FIRST_DELAY,
    POLL_MAX_DELAY,
    Answer,
    FlowerClientState,
    Idle,
    Serve,
)
from stamen.protocol.flower_fleet import (
    ANONYMOUS,
    TRAIN,
    CreateNodeResponse,
    ErrorCode,
    GetRunResponse,
    Node,
    PingResponse,
    PullTaskInsResponse,
    Run,
    TaskIns,
    TaskMeta,
    UnreadableTask,
)
from stamen.testing.certs import generate_node_keys
from stamen.transport.base import TransportSettings
from stamen.transport.flower_fleet import DetectingTransport

NOW = 1_800_000_000.0


def _state() -> FlowerClientState:
    state = FlowerClientState(lambda: NOW, lambda: 0.5)
    state.registered(CreateNodeResponse(Node(42)))
    return state


def _task(task_id: str = "t1", run_id: int = 7, consumer: int = 42) -> TaskIns:
    meta = TaskMeta(
        task_id=task_id,
        run_id=run_id,
        message_type=TRAIN,
        group_id="3",
        producer=ANONYMOUS,
        consumer=Node(consumer),
        created_at=NOW - 10.0,
        ttl=3600.0,
    )
    return TaskIns(meta, FitIns(Parameters([], "numpy.ndarray"), {}))


def test_registration_pings_and_leaving() -> None:
    state = FlowerClientState(lambda: NOW, lambda: 0.5)
    assert state.create_request().ping_interval == 30.0
    assert state.ping_request() is None and state.delete_request() is None
    with pytest.raises(ProtocolError, match="node id"):
        state.registered(CreateNodeResponse(Node(0)))
    state.registered(CreateNodeResponse(Node(42)))
    ping = state.ping_request()
    assert ping is not None and ping.node == Node(42) and ping.ping_interval == 30.0
    assert state.ping_delay() == pytest.approx(25 * 0.8)
    state.pinged(PingResponse(True))
    with pytest.raises(NodeUnknown):
        state.pinged(PingResponse(False))
    gone = state.delete_request()
    assert gone is not None and gone.node == Node(42)
    state.unregistered()
    assert state.delete_request() is None


def test_empty_pulls_back_off_to_flowers_cadence_and_reset_on_a_task() -> None:
    state = _state()
    delays = [state.pulled(PullTaskInsResponse()) for _ in range(10)]
    assert all(isinstance(d, Idle) for d in delays)
    values = [d.delay for d in delays if isinstance(d, Idle)]
    assert values[0] == POLL_FIRST_DELAY and values[-1] == POLL_MAX_DELAY
    assert values == sorted(values)
    assert isinstance(state.pulled(PullTaskInsResponse((_task(),))), Serve)
    again = state.pulled(PullTaskInsResponse())
    assert isinstance(again, Idle) and again.delay == POLL_FIRST_DELAY


def test_get_run_once_per_run_and_tasks_for_others_ignored() -> None:
    state = _state()
    assert isinstance(state.pulled(PullTaskInsResponse((_task(consumer=5),))), Idle)
    first = state.pulled(PullTaskInsResponse((_task("a"),)))
    assert isinstance(first, Serve) and first.get_run is not None
    assert first.get_run.run_id == 7
    state.got_run(GetRunResponse(Run(7)))
    second = state.pulled(PullTaskInsResponse((_task("b"),)))
    assert isinstance(second, Serve) and second.get_run is None
    third = state.pulled(PullTaskInsResponse((_task("c", run_id=8),)))
    assert isinstance(third, Serve) and third.get_run is not None


def test_reply_is_a_task_res_as_a_flower_node_makes_it() -> None:
    state = _state()
    state.pulled(PullTaskInsResponse((_task(),)))
    reply = FitRes(Status(Code.OK, ""), Parameters([], "numpy.ndarray"), 1, {})
    push = state.reply_request(reply)
    assert push.node == Node(42)
    (res,) = push.task_res_list
    meta = res.meta
    assert meta.task_id == "" and meta.run_id == 7 and meta.group_id == "3"
    assert meta.producer == Node(42) and meta.consumer == ANONYMOUS
    assert meta.ancestry == ("t1",) and meta.message_type == TRAIN
    assert meta.created_at == NOW and meta.ttl == pytest.approx(3600.0 - 10.0)
    state.replied()
    with pytest.raises(ConnectionLost):
        state.reply_request(reply)


def test_failing_client_and_unreadable_task_answer_with_flowers_error() -> None:
    state = _state()
    state.pulled(PullTaskInsResponse((_task(),)))
    failed = FitRes(Status(Code.CLIENT_ERROR, "boom"), Parameters([], ""), 0, {})
    (res,) = state.reply_request(failed).task_res_list
    assert res.error is not None and res.reply is None
    assert res.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION and res.error.reason == "boom"
    unreadable = UnreadableTask(_task("q").meta, "task type: query")
    step = state.pulled(PullTaskInsResponse((unreadable,)))
    assert isinstance(step, Answer) and "query" in step.reason
    (res,) = step.push.task_res_list
    assert res.error is not None and res.meta.ancestry == ("q",)


# --- detection -----------------------------------------------------------------------------


class FakeLink:
    def __init__(self, name: str, foreign: str | None = None, fail: Exception | None = None):
        self.name = name
        self.foreign_peer = foreign
        self.fail = fail
        self.connected = False
        self.closed = False

    @property
    def node_id(self) -> int:
        return 1

    def connect(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.connected = True

    def receive(self) -> Any:
        return self.name

    def send(self, reply: Any) -> None:
        pass

    def close(self, *, graceful: bool) -> None:
        self.closed = True


def test_a_stamen_server_keeps_the_stamen_protocol(caplog: pytest.LogCaptureFixture) -> None:
    stamen = FakeLink("stamen")
    built: list[FakeLink] = []
    link = DetectingTransport(
        "grpc-rere", "h:1", stamen, lambda: built.append(FakeLink("f")) or built[0]
    )  # type: ignore[arg-type, func-returns-value]
    with caplog.at_level(logging.INFO, "stamen.client"):
        link.connect()
    assert link.dialect == "stamen" and link.receive() == "stamen" and not built
    assert "speaks Stamen's Fleet protocol" in caplog.text


@pytest.mark.parametrize("answer", ["UNIMPLEMENTED (Method not found!)", "HTTP 404 (Not Found)"])
def test_unknown_create_node_switches_to_flower(
    answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    stamen = FakeLink("stamen", answer, ProtocolError("not served"))
    flower = FakeLink("flower")
    link = DetectingTransport("rest", "h:1", stamen, lambda: flower)  # type: ignore[arg-type, return-value]
    with caplog.at_level(logging.INFO, "stamen.client"):
        link.connect()
    assert link.dialect == "flower" and link.receive() == "flower" and stamen.closed
    assert "speaking Flower 1.12's Fleet API" in caplog.text and answer in caplog.text


def test_other_failures_are_not_taken_for_flower() -> None:
    stamen = FakeLink("stamen", None, ConnectionLost("down"))
    link = DetectingTransport("grpc-rere", "h:1", stamen, lambda: pytest.fail("no switch"))
    with pytest.raises(ConnectionLost):
        link.connect()


def _settings(**kwargs: Any) -> TransportSettings:
    return TransportSettings(address="127.0.0.1:1", max_message_length=1 << 20, **kwargs)


def test_rest_with_authentication_keys_refuses_a_flower_superlink() -> None:
    from stamen.protocol.auth import RequestSigner
    from stamen.transport import rest

    settings = _settings(signer=RequestSigner(*generate_node_keys()))
    with pytest.raises(ConfigError, match="no node authentication"):
        rest._flower_node(settings)


def test_flower_links_keep_tls_and_authentication(caplog: pytest.LogCaptureFixture) -> None:
    from stamen.protocol.auth import RequestSigner
    from stamen.transport import grpc_rere, rest

    settings = _settings(secure=True, root_certificates=b"ca")
    node = rest._flower_node(settings)
    assert node._requester._http._settings is settings  # type: ignore[attr-defined]
    signed = _settings(secure=True, signer=RequestSigner(*generate_node_keys()))
    with caplog.at_level(logging.WARNING, "stamen.client"):
        flower = grpc_rere._flower_node(signed)
    requester = flower._requester
    assert requester._settings is signed and requester._auth is not None  # type: ignore[attr-defined]
    assert "weaker than Stamen's" in caplog.text
