"""A FedAvg subclass that saves the model each round (``aggregate_fit`` overridden, calling
``super()``), over a real grpc-bidi server: the round collects its results in spill files
for ``aggregate_fit`` and folds their mean as they arrive, so ``aggregate_fit`` has no
pass over the results left to make; the model trains as the list of results computes it.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

import stamen as fl
from stamen.ndarrays import parameters_to_ndarrays
from stamen.server import ServerConfig
from stamen.server.spill import SpillStore
from stamen.server.strategy.aggregate import aggregate
from stamen.testing import NodeThread, node_threads, running_server
from stamen.typing import Config, NDArrays, Scalar

fedavg_module = importlib.import_module("stamen.server.strategy.fedavg")

WAIT = 60.0
LIMIT = 64 * 1024  # grpc_max_message_length: the model travels in frames
SIZE = 50_000


class Steps(fl.client.NumPyClient):
    """Returns ``parameters + step`` (float32 and int64 layers) with ``k`` examples."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.step = np.float32(1 / (k + 2))  # inexact: float32 rounding shows

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        weights, counter = parameters
        return [weights + self.step, counter + self.k], self.k, {}


class SavesTheModel(fl.server.strategy.FedAvg):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: list[NDArrays] = []
        self.results_seen: list[int] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.results_seen.append(len(results))
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.saved.append(fl.common.parameters_to_ndarrays(parameters))
        return parameters, metrics


def test_a_saving_subclass_trains_as_the_list_of_results_computes(monkeypatch: Any) -> None:
    calls: list[int] = []

    def counted(results: Any) -> NDArrays:
        calls.append(len(results))
        return aggregate(results)

    monkeypatch.setattr(fedavg_module, "aggregate", counted)
    ks = (1, 2, 3)
    initial = [np.zeros(SIZE, dtype=np.float32), np.zeros(3, dtype=np.int64)]
    strategy = SavesTheModel(
        min_fit_clients=len(ks),
        min_available_clients=len(ks),
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(initial),
    )
    rounds = 3
    with running_server(
        config=ServerConfig(num_rounds=rounds), strategy=strategy, grpc_max_message_length=LIMIT
    ) as srv:
        srv.server.spill = SpillStore(budget=0)  # every result waits in a spill file
        with node_threads() as nodes:
            for k in ks:
                client = Steps(k).to_client()
                kwargs = {
                    "server_address": srv.address,
                    "transport": "grpc-bidi",
                    "client": client,
                    "grpc_max_message_length": LIMIT,
                }
                nodes.append(NodeThread(kwargs).start())
            srv.result(WAIT)
            for node in nodes:
                assert node.join(WAIT) is None
        final = parameters_to_ndarrays(srv.server.parameters)
    assert strategy.results_seen == [len(ks)] * rounds
    assert calls == []  # every round's mean was folded as its results arrived
    # Each round as the list of its results computes it, from the model before it, in
    # instruction order (the client manager's sampling order is not known here: the
    # bits must be those of one order of the three).
    orders = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    before = initial
    for saved in strategy.saved:
        updates = [([before[0] + Steps(k).step, before[1] + k], k) for k in ks]
        candidates = [aggregate([updates[i] for i in order]) for order in orders]
        assert any([a.tobytes() for a in c] == [a.tobytes() for a in saved] for c in candidates)
        before = saved
    assert len(strategy.saved) == rounds
    assert [a.tobytes() for a in final] == [a.tobytes() for a in strategy.saved[-1]]
    assert final[0].dtype == np.float32 and final[1].dtype == np.int64
    step = sum(k / (k + 2) for k in ks) / sum(ks)
    np.testing.assert_allclose(final[0], np.full(SIZE, rounds * step), rtol=1e-5)
    np.testing.assert_array_equal(final[1], np.full(3, rounds * 2))  # rint(14 / 6) a round
