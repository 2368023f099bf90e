"""Rounds over a real grpc-bidi server leave no reference cycle that holds Stamen's objects
or a model's memory: what a round allocates is freed when the last reference goes, not
left to Python's cyclic garbage collector.

The server scales the collector's young-generation threshold with the number of nodes in
a round (``stamen.memory.scale_collector``): collections then come later, and a cycle that
held a model would hold it longer. This is the test that there is none to wait for, in a
streaming round (FedAvg), a round that collects its results in spill files (FedMedian) and
one that folds them early for a FedAvg subclass.
"""

from __future__ import annotations

import gc
import mmap
from collections import Counter
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.server import ServerConfig
from stamen.server.spill import SpillStore
from stamen.testing import NodeThread, node_threads, running_server
from stamen.typing import Config, NDArrays, Scalar

WAIT = 60.0
LIMIT = 64 * 1024  # grpc_max_message_length: the model travels in frames
SIZE = 50_000
NODES = 3


class AddOne(fl.client.NumPyClient):
    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return [p + 1 for p in parameters], 1, {}


class SavesTheModel(fl.server.strategy.FedAvg):
    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.saved = fl.common.parameters_to_ndarrays(parameters)
        return parameters, metrics


def _kept_alive(garbage: list[Any]) -> Counter[str]:
    """The objects among ``garbage`` that matter: Stamen's own, and memory (arrays,
    views, mappings), by type."""
    found: Counter[str] = Counter()
    for obj in garbage:
        kind = type(obj)
        if kind.__module__.startswith("stamen") or isinstance(
            obj, np.ndarray | memoryview | mmap.mmap
        ):
            found[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return found


@pytest.mark.parametrize("form", ["fedavg", "fedmedian", "subclass"])
def test_rounds_leave_no_cycle_behind(form: str) -> None:
    initial = fl.common.ndarrays_to_parameters([np.zeros(SIZE, dtype=np.float32)])
    kwargs = {
        "min_fit_clients": NODES,
        "min_available_clients": NODES,
        "fraction_evaluate": 0.0,
        "initial_parameters": initial,
    }
    strategies = {
        "fedavg": fl.server.strategy.FedAvg,
        "fedmedian": fl.server.strategy.FedMedian,
        "subclass": SavesTheModel,
    }
    strategy = strategies[form](**kwargs)
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage
    try:
        with running_server(
            config=ServerConfig(num_rounds=3), strategy=strategy, grpc_max_message_length=LIMIT
        ) as srv:
            srv.server.spill = SpillStore(budget=0)  # collected results wait on disk
            with node_threads() as nodes:
                for _ in range(NODES):
                    node = {
                        "server_address": srv.address,
                        "transport": "grpc-bidi",
                        "client": AddOne().to_client(),
                        "grpc_max_message_length": LIMIT,
                    }
                    nodes.append(NodeThread(node).start())
                srv.result(WAIT)
                for node in nodes:
                    assert node.join(WAIT) is None
            final = fl.common.parameters_to_ndarrays(srv.server.parameters)
        gc.collect()
        found = _kept_alive(gc.garbage)
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    np.testing.assert_array_equal(final[0], np.full(SIZE, 3, dtype=np.float32))  # trained
    assert not found, f"reference cycles held {dict(found)}"
