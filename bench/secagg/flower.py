"""Flower 1.12's SecAgg+ on the workload of ``run.py``: one FedAvg fit round, with and
without ``SecAggPlusWorkflow``, under ``flwr.simulation.run_simulation`` (Ray).

Run by ``run.py --flower PYTHON``, where PYTHON has ``flwr[simulation]==1.12.0``
(``make .venv-flwr-sim/.installed``)::

    .venv/bin/python bench/secagg/run.py --flower .venv-flwr-sim/bin/python --repeat 1
    .venv/bin/python bench/secagg/run.py --flower .venv-flwr-sim/bin/python --repeat 1 \\
        --nodes 100 --shares 7 --threshold 4

Each case runs in a process of its own. The model is one 1000 x (params / 1000) float32
layer; a node's ``fit`` adds a constant (as in ``run.py``), so the plain round is nearly
all messaging and aggregation. Nodes carry ``secaggplus_mod`` in the secure case only;
Ray runs them, one CPU each (so 2 at a time here). Two rounds run and the second is
timed (the first starts Ray's actors), from the strategy's ``configure_fit`` (the
workflow's first step of the fit round, SecAgg+'s setup included) to the return of its
``aggregate_fit`` (after unmasking). ``cpu_s`` and ``peak_rss_mb`` are the server
process's only (the ServerApp, its driver and the simulation engine): Ray's workers,
which run the nodes, are other processes and not counted; bytes are not measured.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any


def _case(nodes: int, params: int, secure: bool, shares: int, threshold: int) -> dict[str, Any]:
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Driver, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    rows, cols = 1000, params // 1000
    marks: dict[str, float] = {}

    class Client(NumPyClient):
        def __init__(self, k: int) -> None:
            self.k = k

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [p + np.float32(0.001 * self.k) for p in parameters], 10 + self.k, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client(int(context.node_config["partition-id"])).to_client()

    class Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            if server_round == _TIMED:
                marks["start"], marks["cpu_start"] = time.perf_counter(), _cpu()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(server_round, results, failures)
            if server_round == _TIMED:
                marks["end"], marks["cpu_end"] = time.perf_counter(), _cpu()
                marks["results"], marks["failures"] = len(results), len(failures)
            return out

    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros((rows, cols), np.float32)]),
    )
    server_app = ServerApp()

    @server_app.main()
    def main(driver: Driver, context: Context) -> None:
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=_TIMED), strategy=strategy
        )
        fit = (
            SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold)
            if secure
            else None
        )
        workflow = DefaultWorkflow(fit_workflow=fit) if fit is not None else DefaultWorkflow()
        workflow(driver, legacy)

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    total = time.perf_counter() - started
    if "end" not in marks:
        raise RuntimeError(f"the round did not finish: {marks}")
    return {
        "framework": "flwr 1.12 (run_simulation, Ray)",
        "nodes": nodes,
        "params": rows * cols,
        "secagg": secure,
        "num_shares": shares if secure else None,
        "threshold": threshold if secure else None,
        "round_s": round(marks["end"] - marks["start"], 3),
        "cpu_s": round(marks["cpu_end"] - marks["cpu_start"], 3),
        "results": int(marks["results"]),
        "failures": int(marks["failures"]),
        "run_s": round(total, 1),
        "bytes_per_node": None,
        "bytes_server": None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


_TIMED = 2
"""The round timed: the first one starts Ray's actors and warms the nodes."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """``flower.py --case NODES PARAMS SECURE SHARES THRESHOLD``: one case, as a JSON line."""
    if len(sys.argv) != 7 or sys.argv[1] != "--case":
        raise SystemExit(f"usage: {sys.argv[0]} --case NODES PARAMS SECURE SHARES THRESHOLD")
    n, p, s, k, t = (int(v) for v in sys.argv[2:])
    print(json.dumps(_case(n, p, bool(s), k, t)))


if __name__ == "__main__":
    main()
