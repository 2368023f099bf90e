"""The client node loop (run_node) over a scripted fake transport and a fake clock."""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from stamen.client import Client, NumPyClient
from stamen.client.app import MAX_RECONNECT_SECONDS, NodeConfig, make_node_config, run_node
from stamen.context import Context
from stamen.errors import (
    AuthError,
    ConnectError,
    ConnectionLost,
    DecodeError,
    MessageTooLarge,
    Timeout,
)
from stamen.messages import (
    Code,
    DisconnectRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Parameters,
    ReconnectIns,
    Reply,
    Status,
)
from stamen.ndarrays import TENSOR_TYPE, ndarray_to_bytes, ndarrays_to_parameters
from stamen.testing import FakeClock
from stamen.transport.base import ClientTransport

PROPS = GetPropertiesIns(config={})
FIT = FitIns(parameters=ndarrays_to_parameters([np.ones(2)]), config={})
BYE = ReconnectIns(seconds=0)


@dataclass
class Link:
    """What one connection does: fail to connect, or deliver ``inbox`` in order.

    Items of ``inbox`` that are exceptions are raised by receive(); ``reject`` makes send()
    raise MessageTooLarge for the replies it selects.
    """

    connect_error: BaseException | None = None
    inbox: list[Instruction | BaseException] = field(default_factory=list)
    reject: Callable[[Reply], bool] | None = None


class FakeTransport:
    """A ClientTransport whose behaviour is scripted by one Link."""

    def __init__(self, network: FakeNetwork, link: Link) -> None:
        self._network = network
        self._link = link
        self._inbox = list(link.inbox)

    @property
    def node_id(self) -> int:
        return self._network.node_id

    def connect(self) -> None:
        self._network.connects += 1
        if self._link.connect_error is not None:
            raise self._link.connect_error

    def receive(self) -> Instruction:
        if not self._inbox:
            raise AssertionError("the script has no more instructions for this link")
        item = self._inbox.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def send(self, reply: Reply) -> None:
        if self._link.reject is not None and self._link.reject(reply):
            raise MessageTooLarge(f"{type(reply).__name__} is over the limit")
        self._network.sent.append(reply)

    def close(self, *, graceful: bool) -> None:
        self._network.closes.append(graceful)


class FakeNetwork:
    """Hands out one FakeTransport per connection attempt; the last Link repeats."""

    MAX_TRANSPORTS = 100

    def __init__(self, *links: Link, node_id: int = -1) -> None:
        self._links = list(links)
        self.node_id = node_id
        self.transports = 0
        self.connects = 0
        self.sent: list[Reply] = []
        self.closes: list[bool] = []

    def factory(self, config: NodeConfig) -> ClientTransport:
        self.transports += 1
        if self.transports > self.MAX_TRANSPORTS:
            raise AssertionError("run_node kept reconnecting")
        link = self._links.pop(0) if len(self._links) > 1 else self._links[0]
        return FakeTransport(self, link)


class Answering(NumPyClient):
    """Answers get_properties and fit."""

    def get_properties(self, config: Any) -> dict[str, Any]:
        return {"ok": True}

    def fit(self, parameters: Any, config: Any) -> Any:
        return parameters, 3, {}


def _client_fn(context: Context) -> Client:
    return Answering().to_client()


def _config(
    client_fn: Callable[[Context], Client] = _client_fn,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> NodeConfig:
    return make_node_config(
        server_address="127.0.0.1:1",
        client_fn=client_fn,
        client=None,
        grpc_max_message_length=1024,
        root_certificates=None,
        insecure=None,
        transport=None,
        authentication_keys=None,
        max_retries=max_retries,
        max_wait_time=max_wait_time,
    )


def _run(
    network: FakeNetwork,
    config: NodeConfig,
    clock: FakeClock,
    rng: Callable[[], float] = lambda: 0.5,
) -> None:
    run_node(config, clock=clock, rng=rng, transport_factory=network.factory)


def test_max_retries_two_makes_three_attempts_then_raises() -> None:
    """max_retries=2 against a dead server: 3 connects, 2 sleeps (<= 1 s, <= 2 s), ConnectError."""
    network = FakeNetwork(Link(connect_error=ConnectError("refused")))
    clock = FakeClock()
    with pytest.raises(ConnectError) as info:
        _run(network, _config(max_retries=2), clock, rng=random.Random(3).random)
    assert network.connects == 3
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 1
    assert 0 <= clock.sleeps[1] <= 2
    assert "127.0.0.1:1" in str(info.value)
    assert "3" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectError)
    assert network.closes == [False, False, False]


def test_max_retries_zero_raises_after_one_attempt() -> None:
    """max_retries=0: one attempt, no sleep, ConnectError."""
    network = FakeNetwork(Link(connect_error=ConnectError("refused")))
    clock = FakeClock()
    with pytest.raises(ConnectError):
        _run(network, _config(max_retries=0), clock)
    assert network.connects == 1
    assert clock.sleeps == []


def test_max_wait_time_gives_up_once_the_fake_time_has_passed() -> None:
    """max_wait_time=3: attempts until 3 fake seconds have passed, never waiting beyond."""
    network = FakeNetwork(Link(connect_error=ConnectError("refused")))
    clock = FakeClock(start=100.0)
    with pytest.raises(ConnectError):
        _run(network, _config(max_wait_time=3), clock, rng=lambda: 0.5)
    # rng 0.5: waits 0.5, 1.0, then 2.0 cut to the 1.5 s left; then time is up.
    assert clock.sleeps == pytest.approx([0.5, 1.0, 1.5])
    assert clock.now == pytest.approx(103.0)
    assert network.connects == 4


def test_max_wait_time_bounds_total_sleep_with_random_jitter() -> None:
    """Whatever the jitter, the sleeps add up to at most max_wait_time and then it stops."""
    for seed in range(20):
        network = FakeNetwork(Link(connect_error=ConnectionLost("reset")))
        clock = FakeClock()
        with pytest.raises(ConnectError):
            _run(network, _config(max_wait_time=3), clock, rng=random.Random(seed).random)
        assert sum(clock.sleeps) <= 3.0 + 1e-9
        assert clock.now >= 3.0 - 1e-9


def test_connection_lost_after_an_instruction_resets_the_retry_budget() -> None:
    """A session that delivered an instruction proves the server works: budget starts over.

    max_retries=1: fail, connect+instruction+lost, connect -> without the reset the loss
    would be the 2nd failure and the node would give up.
    """
    network = FakeNetwork(
        Link(connect_error=ConnectError("refused")),
        Link(inbox=[PROPS, ConnectionLost("stream reset")]),
        Link(inbox=[BYE]),
    )
    clock = FakeClock()
    _run(network, _config(max_retries=1), clock)
    assert network.connects == 3
    assert len(clock.sleeps) == 2
    assert [type(r) for r in network.sent] == [GetPropertiesRes, DisconnectRes]


def test_connection_lost_without_an_instruction_does_not_reset_the_budget() -> None:
    """Connecting alone does not reset retries: a server that drops every stream is given up."""
    network = FakeNetwork(Link(inbox=[ConnectionLost("stream reset")]))
    clock = FakeClock()
    with pytest.raises(ConnectError):
        _run(network, _config(max_retries=1), clock)
    assert network.connects == 2
    assert network.sent == []


def test_reconnect_zero_sends_ack_and_returns() -> None:
    """ReconnectIns(0): DisconnectRes(reason='RECONNECT') is sent (as by Flower nodes), the
    link is closed gracefully, and run_node returns."""
    network = FakeNetwork(Link(inbox=[BYE]))
    clock = FakeClock()
    assert _run(network, _config(), clock) is None
    assert network.sent == [DisconnectRes(reason="RECONNECT")]
    assert network.closes == [True]
    assert network.connects == 1
    assert clock.sleeps == []


def test_reconnect_none_is_the_same_as_zero() -> None:
    """ReconnectIns(None) (what start_server sends) also ends the node."""
    network = FakeNetwork(Link(inbox=[ReconnectIns(seconds=None)]))
    _run(network, _config(), FakeClock())
    assert network.sent == [DisconnectRes(reason="RECONNECT")]


def test_reconnect_later_sleeps_and_reconnects() -> None:
    """ReconnectIns(5): reason RECONNECT, close, sleep 5 s on the clock, connect again."""
    network = FakeNetwork(Link(inbox=[ReconnectIns(seconds=5)]), Link(inbox=[PROPS, BYE]))
    clock = FakeClock()
    _run(network, _config(max_retries=0), clock)
    assert clock.sleeps == [5]
    assert network.connects == 2
    assert network.sent[0] == DisconnectRes(reason="RECONNECT")
    assert isinstance(network.sent[1], GetPropertiesRes)
    assert network.sent[2] == DisconnectRes(reason="RECONNECT")
    assert network.closes == [True, True]


@pytest.mark.parametrize("seconds", [10**9, 2**63 - 1])
def test_a_server_cannot_put_a_node_to_sleep_for_years(
    seconds: int, caplog: pytest.LogCaptureFixture
) -> None:
    """ReconnectIns(10**9) (31 years) or 2**63-1 (no clock can sleep that: an
    OverflowError before) makes the node wait at most MAX_RECONNECT_SECONDS, with a
    warning, then reconnect."""
    network = FakeNetwork(Link(inbox=[ReconnectIns(seconds=seconds)]), Link(inbox=[BYE]))
    clock = FakeClock()
    _run(network, _config(max_retries=0), clock)
    assert clock.sleeps == [MAX_RECONNECT_SECONDS]
    assert network.connects == 2
    assert "waiting the maximum" in caplog.text


def test_decode_error_is_raised_at_once_without_retry() -> None:
    """A DecodeError from receive() is final: raised as is, one attempt, no sleep."""
    network = FakeNetwork(Link(inbox=[DecodeError("garbage from server")]))
    clock = FakeClock()
    with pytest.raises(DecodeError, match="garbage"):
        _run(network, _config(), clock)
    assert network.connects == 1
    assert clock.sleeps == []
    assert network.closes == [False]


def test_auth_error_on_connect_is_not_retried() -> None:
    """AuthError is not a TransportError: no retry."""
    network = FakeNetwork(Link(connect_error=AuthError("denied")))
    clock = FakeClock()
    with pytest.raises(AuthError):
        _run(network, _config(), clock)
    assert network.connects == 1
    assert clock.sleeps == []


def test_timeout_is_retried_like_any_transport_error() -> None:
    """Timeout is a TransportError: it is retried under the policy."""
    network = FakeNetwork(Link(connect_error=Timeout("slow")), Link(inbox=[BYE]))
    _run(network, _config(max_retries=1), FakeClock())
    assert network.connects == 2


def test_too_large_reply_becomes_a_client_error_reply() -> None:
    """A reply the transport refuses as too large is replaced by a CLIENT_ERROR reply."""
    network = FakeNetwork(
        Link(
            inbox=[FIT, BYE],
            reject=lambda r: isinstance(r, FitRes) and r.status.code == Code.OK,
        )
    )
    _run(network, _config(), FakeClock())
    fit_reply, bye = network.sent
    assert isinstance(fit_reply, FitRes)
    assert fit_reply.status.code == Code.CLIENT_ERROR
    assert "over the limit" in fit_reply.status.message
    assert bye == DisconnectRes(reason="RECONNECT")


def test_user_error_in_fit_is_a_client_error_reply_and_the_node_goes_on() -> None:
    """An exception in fit becomes CLIENT_ERROR; the node keeps serving the next messages."""

    class Failing(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            raise ZeroDivisionError("oops")

    network = FakeNetwork(Link(inbox=[FIT, PROPS, BYE]))
    _run(network, _config(client_fn=lambda c: Failing().to_client()), FakeClock())
    fit_reply, props_reply, bye = network.sent
    assert isinstance(fit_reply, FitRes)
    assert fit_reply.status.code == Code.CLIENT_ERROR
    assert "ZeroDivisionError" in fit_reply.status.message
    assert props_reply.status.code == Code.GET_PROPERTIES_NOT_IMPLEMENTED  # type: ignore[union-attr]
    assert bye == DisconnectRes(reason="RECONNECT")


def test_one_context_per_run_across_messages_and_reconnects() -> None:
    """client_fn gets the same Context (node_id from the transport) for every message."""
    contexts: list[Context] = []

    def client_fn(context: Context) -> Client:
        contexts.append(context)
        return Answering().to_client()

    network = FakeNetwork(
        Link(inbox=[PROPS, ConnectionLost("blip")]),
        Link(inbox=[PROPS, ReconnectIns(seconds=1)]),
        Link(inbox=[FIT, BYE]),
        node_id=42,
    )
    _run(network, _config(client_fn=client_fn), FakeClock())
    assert len(contexts) == 3
    assert all(c is contexts[0] for c in contexts)
    assert contexts[0].node_id == 42
    assert contexts[0].node_config == {}
    assert contexts[0].run_config == {}


def test_keyboard_interrupt_closes_the_link_and_propagates() -> None:
    """A KeyboardInterrupt inside the loop closes the transport and is re-raised."""
    network = FakeNetwork(Link(inbox=[KeyboardInterrupt()]))
    with pytest.raises(KeyboardInterrupt):
        _run(network, _config(), FakeClock())
    assert network.closes == [False]


def _traced_tensor(refs: list[weakref.ref[Any]]) -> memoryview:
    """A tensor over an array of its own, whose life ``refs`` records."""
    blob = np.frombuffer(ndarray_to_bytes(np.ones(4)), dtype=np.uint8).copy()
    refs.append(weakref.ref(blob))
    return blob.data  # the tensor keeps the array alive, and nothing else does


class TracedReplies(Client):
    """Answers fit with a tensor whose life is traced."""

    def __init__(self, refs: list[weakref.ref[Any]]) -> None:
        self.refs = refs

    def fit(self, ins: FitIns) -> FitRes:
        parameters = Parameters(tensors=[_traced_tensor(self.refs)], tensor_type=TENSOR_TYPE)
        return FitRes(Status(Code.OK, ""), parameters, 1, {})


class Forgetful:
    """A transport that keeps nothing it hands out or is given, and records, each time the
    node waits for an instruction, how many earlier instructions and replies are alive."""

    node_id = 7

    def __init__(self, instructions: int, refs: list[weakref.ref[Any]]) -> None:
        self._left = instructions
        self._refs = refs
        self.alive_while_waiting: list[int] = []

    def connect(self) -> None:
        pass

    def receive(self) -> Instruction:
        self.alive_while_waiting.append(sum(ref() is not None for ref in self._refs))
        if not self._left:
            return BYE
        self._left -= 1
        parameters = Parameters(tensors=[_traced_tensor(self._refs)], tensor_type=TENSOR_TYPE)
        return FitIns(parameters=parameters, config={})

    def send(self, reply: Reply) -> None:
        pass

    def close(self, *, graceful: bool) -> None:
        pass


def test_the_node_holds_no_instruction_or_reply_while_it_waits_for_the_next() -> None:
    """Between rounds the node keeps neither the last instruction nor its reply: for a
    large model those are the received message and the encoded reply, which the next
    round's can then reuse instead of growing the process."""
    refs: list[weakref.ref[Any]] = []
    transport = Forgetful(3, refs)
    config = _config(client_fn=lambda context: TracedReplies(refs))
    run_node(config, clock=FakeClock(), rng=lambda: 0.5, transport_factory=lambda c: transport)
    assert len(refs) == 6  # 3 instructions, 3 replies
    assert transport.alive_while_waiting == [0, 0, 0, 0]
