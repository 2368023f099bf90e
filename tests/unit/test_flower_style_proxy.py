"""ClientProxy subclasses written the Flower way (the five blocking methods) drive a Server."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from stamen.client import NumPyClient
from stamen.client.dispatch import handle
from stamen.context import Context, RecordSet
from stamen.errors import ProtocolError, Timeout
from stamen.messages import (
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server import ClientProxy, Server, SimpleClientManager
from stamen.server.strategy import FedAvg


class Trainer(NumPyClient):
    def __init__(self, delta: float) -> None:
        self.delta = delta

    def get_parameters(self, config: Any) -> list[np.ndarray]:
        return [np.zeros(3)]

    def fit(self, parameters: Any, config: Any) -> Any:
        return [p + self.delta for p in parameters], 1, {}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return float(np.abs(parameters[0]).sum()), 1, {}


class FlowerStyleProxy(ClientProxy):
    """The way Flower's tests and several libraries write a proxy: blocking methods only."""

    def __init__(self, cid: str, delta: float) -> None:
        super().__init__(cid)
        self.client = Trainer(delta).to_client()
        self.context = Context(node_id=0, node_config={}, state=RecordSet(), run_config={})
        self.threads: list[str] = []

    def _run(self, ins: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return handle(lambda context: self.client, self.context, ins)

    def get_properties(
        self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None = None
    ) -> GetPropertiesRes:
        return self._run(ins)  # type: ignore[no-any-return]

    def get_parameters(
        self, ins: GetParametersIns, timeout: float | None, group_id: int | None = None
    ) -> GetParametersRes:
        return self._run(ins)  # type: ignore[no-any-return]

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None = None) -> FitRes:
        return self._run(ins)  # type: ignore[no-any-return]

    def evaluate(
        self, ins: EvaluateIns, timeout: float | None, group_id: int | None = None
    ) -> EvaluateRes:
        return self._run(ins)  # type: ignore[no-any-return]

    def reconnect(
        self, ins: ReconnectIns, timeout: float | None, group_id: int | None = None
    ) -> DisconnectRes:
        return DisconnectRes(reason="ACK")


def test_a_flower_style_proxy_trains_with_server_and_simple_client_manager() -> None:
    """Two Flower-style proxies: initial parameters from get_parameters, two rounds of fit
    and evaluate, each call on a thread other than the round's, the end acknowledged."""
    manager = SimpleClientManager(wait_timeout=1.0)
    proxies = [FlowerStyleProxy("a", 1.0), FlowerStyleProxy("b", 3.0)]
    for proxy in proxies:
        assert manager.register(proxy)
    server = Server(client_manager=manager, strategy=FedAvg())
    history, _ = server.fit(num_rounds=2, timeout=5.0)
    assert parameters_to_ndarrays(server.parameters)[0].tolist() == [4.0, 4.0, 4.0]
    assert history.losses_distributed == [(1, 6.0), (2, 12.0)]
    server.disconnect_all_clients()
    main = threading.current_thread().name
    assert all(name != main for proxy in proxies for name in proxy.threads)


def test_the_blocking_methods_of_the_base_still_work_on_a_primitive_proxy() -> None:
    """A Flower-style proxy's submit() resolves; its own fit() answers directly."""
    proxy = FlowerStyleProxy("a", 2.0)
    ins = FitIns(ndarrays_to_parameters([np.zeros(2)]), {})
    reply = proxy.submit(ins, 5.0).result(5.0)
    assert isinstance(reply, FitRes)
    assert parameters_to_ndarrays(reply.parameters)[0].tolist() == [2.0, 2.0]


def test_a_proxy_with_neither_half_cannot_be_instantiated() -> None:
    """No send/submit and no blocking method: a TypeError naming what to implement, at
    construction (not an endless recursion at the first call)."""

    class Empty(ClientProxy):
        pass

    with pytest.raises(TypeError, match=r"send\(\) or submit\(\).*get_parameters, fit"):
        Empty("x")


def test_a_blocking_call_that_outlives_its_timeout_fails_with_timeout() -> None:
    """The future fails with Timeout after the call's timeout; the late reply is dropped."""
    release = threading.Event()

    class Slow(FlowerStyleProxy):
        def fit(self, ins: FitIns, timeout: float | None, group_id: int | None = None) -> FitRes:
            release.wait(10.0)
            return super().fit(ins, timeout, group_id)

    proxy = Slow("slow", 1.0)
    future = proxy.submit(FitIns(ndarrays_to_parameters([np.zeros(1)]), {}), 0.05)
    try:
        with pytest.raises(Timeout, match="slow"):
            future.result(5.0)
    finally:
        release.set()


def test_an_instruction_without_its_method_fails_clearly() -> None:
    """A proxy with only fit(): an EvaluateIns fails with ProtocolError naming evaluate."""

    class FitOnly(ClientProxy):
        def fit(self, ins: FitIns, timeout: float | None, group_id: int | None = None) -> FitRes:
            raise AssertionError("not called")

    future = FitOnly("f").submit(EvaluateIns(ndarrays_to_parameters([]), {}), 1.0)
    with pytest.raises(ProtocolError, match="evaluate"):
        future.result(5.0)
