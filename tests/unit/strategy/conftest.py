"""Fixtures of the strategy tests: fake client proxies, results and a client manager."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from stamen.messages import Code, EvaluateRes, FitRes, Instruction, Parameters, Reply, Status
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server.client_manager import SimpleClientManager
from stamen.server.client_proxy import ClientProxy
from stamen.typing import NDArrays, Scalar

OK = Status(code=Code.OK, message="")


class FakeProxy(ClientProxy):
    """A client proxy that is never called: strategies only read its ``cid``."""

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        raise AssertionError("strategies must not call clients")


class StrategyKit:
    """Builders for strategy inputs, and a reader for their outputs."""

    @staticmethod
    def proxy(cid: str) -> FakeProxy:
        return FakeProxy(cid)

    @staticmethod
    def params(arrays: NDArrays) -> Parameters:
        return ndarrays_to_parameters(arrays)

    @staticmethod
    def arrays(parameters: Parameters | None) -> NDArrays:
        assert parameters is not None, "the strategy did not aggregate"
        return parameters_to_ndarrays(parameters)

    @staticmethod
    def fit_res(
        arrays: NDArrays, num_examples: int, metrics: dict[str, Scalar] | None = None
    ) -> FitRes:
        return FitRes(OK, ndarrays_to_parameters(arrays), num_examples, metrics or {})

    def results(
        self, models: Sequence[tuple[NDArrays, int]], metrics: Sequence[dict[str, Scalar]] = ()
    ) -> list[tuple[ClientProxy, FitRes]]:
        """One result per ``(arrays, num_examples)``, from clients ``c0``, ``c1``, ..."""
        return [
            (
                self.proxy(f"c{i}"),
                self.fit_res(arrays, n, metrics[i] if i < len(metrics) else None),
            )
            for i, (arrays, n) in enumerate(models)
        ]

    @staticmethod
    def eval_res(
        loss: float, num_examples: int, metrics: dict[str, Scalar] | None = None
    ) -> EvaluateRes:
        return EvaluateRes(OK, loss, num_examples, metrics or {})

    @staticmethod
    def manager(num_clients: int) -> SimpleClientManager:
        """A client manager with ``num_clients`` fake clients ``c0``... and a fixed seed."""
        manager = SimpleClientManager(wait_timeout=1.0, seed=0)
        for i in range(num_clients):
            manager.register(FakeProxy(f"c{i}"))
        return manager

    @staticmethod
    def vec(*values: float, dtype: Any = np.float64) -> np.ndarray:
        return np.array(values, dtype=dtype)


@pytest.fixture
def kit() -> StrategyKit:
    """Builders for strategy inputs."""
    return StrategyKit()
