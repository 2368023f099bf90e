"""VirtualClientProxy: the server's handle on a simulated node."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from stamen.client import Client, NumPyClient
from stamen.context import Context, MetricsRecord, RecordSet
from stamen.errors import ConnectionLost, DecodeError, ProtocolError
from stamen.messages import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    ReconnectIns,
    Status,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.simulation import SequentialBackend, VirtualClientProxy
from stamen.simulation.backends import Backend
from stamen.simulation.proxy import CallResult, EncodeCache, VirtualCall

PARAMS = ndarrays_to_parameters([np.arange(3, dtype=np.float64)])


class Counter(NumPyClient):
    """Adds one to the parameters; counts its fits in the node's state."""

    def __init__(self, context: Context) -> None:
        self.context_seen = context

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        return [np.zeros(3)]

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict]:
        record = self.context_seen.state.metrics_records.setdefault("n", MetricsRecord())
        record["fits"] = int(record.get("fits", 0)) + 1
        return [parameters[0] + 1], 5, {"fits": record["fits"]}

    def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> tuple[float, int, dict]:
        if config.get("fail"):
            raise ValueError("boom")
        return 0.1, 5, {"partition": self.context_seen.node_config["partition-id"]}


def counter_fn(context: Context) -> Client:
    return Counter(context).to_client()


def make_proxy(
    backend: Backend | None = None, *, client_fn: Any = counter_fn, **kwargs: Any
) -> VirtualClientProxy:
    return VirtualClientProxy(
        "7",
        client_fn=client_fn,
        backend=backend or SequentialBackend(),
        node_id=7,
        node_config={"partition-id": "7", "num-partitions": "10"},
        **kwargs,
    )


def test_reconnect_is_acknowledged_without_calling_user_code() -> None:
    """The end of the run (ReconnectIns) is answered DisconnectRes(ACK); client_fn is not called."""

    def never(context: Context) -> Client:
        raise AssertionError("client_fn must not run for ReconnectIns")

    reply = make_proxy(client_fn=never).reconnect(ReconnectIns(seconds=None), timeout=1.0)
    assert reply == DisconnectRes(reason="ACK")


def test_state_persists_per_node_and_the_client_is_built_per_call() -> None:
    """Each call builds a new client; the node's Context (and its state) is the same object."""
    proxy = make_proxy()
    first = proxy.fit(FitIns(parameters=PARAMS, config={}), timeout=5.0)
    second = proxy.fit(FitIns(parameters=first.parameters, config={}), timeout=5.0)
    assert (first.metrics["fits"], second.metrics["fits"]) == (1, 2)
    np.testing.assert_array_equal(parameters_to_ndarrays(second.parameters)[0], [2, 3, 4])
    context = proxy.context
    assert context.node_id == 7
    assert context.node_config == {"partition-id": "7", "num-partitions": "10"}
    assert context.state.metrics_records["n"]["fits"] == 2


def test_user_exception_is_a_client_error_reply_naming_the_stage() -> None:
    """An exception in evaluate becomes an EvaluateRes with CLIENT_ERROR, as on the network."""
    reply = make_proxy().evaluate(EvaluateIns(parameters=PARAMS, config={"fail": True}), 5.0)
    assert reply.status.code == Code.CLIENT_ERROR
    assert "evaluate raised ValueError: boom" in reply.status.message


def test_serialize_round_trips_messages_through_the_wire_codec() -> None:
    """With serialize=True the loss comes back as the wire's 32-bit float; without, exact."""
    ins = EvaluateIns(parameters=PARAMS, config={})
    plain = make_proxy().evaluate(ins, 5.0)
    wired = make_proxy(serialize=True, encode_cache=EncodeCache()).evaluate(ins, 5.0)
    assert plain.loss == 0.1
    assert wired.loss == float(np.float32(0.1))
    assert wired.metrics == {"partition": "7"}


class _Canned(Backend):
    """Returns a canned outcome for every call, and records the calls."""

    def __init__(self, outcome: CallResult | BaseException) -> None:
        self.outcome = outcome
        self.calls: list[VirtualCall] = []

    @property
    def concurrency(self) -> int:
        return 1

    def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
        self.calls.append(call)
        future: Future[CallResult] = Future()
        if isinstance(self.outcome, BaseException):
            future.set_exception(self.outcome)
        else:
            future.set_result(self.outcome)
        return future


def test_an_undecodable_reply_fails_the_call_naming_client_and_stage() -> None:
    """Reply bytes that do not decode fail the future with DecodeError naming the node."""
    proxy = make_proxy(_Canned((b"\xff\xff", RecordSet())), serialize=True)
    future = proxy.submit(FitIns(parameters=PARAMS, config={}), 1.0)
    with pytest.raises(DecodeError, match="virtual client 7, fit"):
        future.result(timeout=5)


def test_a_reply_of_the_wrong_kind_is_a_protocol_error() -> None:
    """An EvaluateRes in answer to FitIns fails the call with ProtocolError."""
    wrong = EvaluateRes(status=Status(Code.OK, ""), loss=0.0, num_examples=1, metrics={})
    future = make_proxy(_Canned((wrong, RecordSet()))).submit(
        FitIns(parameters=PARAMS, config={}), 1.0
    )
    with pytest.raises(ProtocolError, match="expected FitRes"):
        future.result(timeout=5)


def test_state_returned_by_the_backend_replaces_the_nodes_state() -> None:
    """A backend in another process sends the state back; the proxy keeps that copy."""
    state = RecordSet()
    state.metrics_records["seen"] = MetricsRecord({"x": 1})
    ok = FitRes(status=Status(Code.OK, ""), parameters=PARAMS, num_examples=1, metrics={})
    proxy = make_proxy(_Canned((ok, state)))
    assert proxy.fit(FitIns(parameters=PARAMS, config={}), 1.0) == ok
    assert proxy.context.state is state


def test_the_backend_failure_is_the_calls_failure() -> None:
    """An error from the backend (here ConnectionLost) fails the call as is."""
    lost = ConnectionLost("virtual client 7, fit: the Ray worker was lost")
    future = make_proxy(_Canned(lost)).submit(GetParametersIns(config={}), 1.0)
    with pytest.raises(ConnectionLost, match="worker was lost"):
        future.result(timeout=5)


def test_a_closed_backend_fails_the_call_with_connection_lost() -> None:
    """Submitting after the backend closed fails the future, it does not raise."""

    class Closed(_Canned):
        def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
            raise RuntimeError("the threads backend is closed")

    future = make_proxy(Closed(ConnectionLost("unused"))).submit(GetParametersIns(config={}), 1.0)
    with pytest.raises(ConnectionLost, match="virtual client 7, get_parameters"):
        future.result(timeout=5)


def test_encode_cache_encodes_one_instruction_object_once() -> None:
    """The same instruction object gives the same payload object; another object is encoded."""
    cache = EncodeCache()
    ins = FitIns(parameters=PARAMS, config={})
    assert cache.encode(ins) is cache.encode(ins)
    assert cache.encode(FitIns(parameters=PARAMS, config={})).tobytes() == (
        cache.encode(ins).tobytes()
    )
