"""Flower 1.12's SecAgg+ on the workload of ``run.py``: one FedAvg fit round, with and
without ``SecAggPlusWorkflow``, under ``flwr.simulation.run_simulation`` (Ray).

Usage (under a virtualenv with ``flwr[simulation]==1.12.0``, ``make .venv-flwr-sim/.installed``)::

    .venv-flwr-sim/bin/python bench/secagg/flower.py --nodes 10 --shares 5 --threshold 3
    .venv-flwr-sim/bin/python bench/secagg/flower.py --nodes 100 --shares 15 --threshold 8

Each case runs in a process of its own. The model is one 1000 x (params / 1000) float32
layer; a node's ``fit`` adds a constant (as in ``run.py``), so the plain round is nearly
all messaging and aggregation. Nodes carry ``secaggplus_mod`` in the secure case only.
Two rounds run and the second is timed (the first starts Ray's actors), from the
strategy's ``configure_fit`` (the workflow's first step of the fit round, SecAgg+'s
setup included) to the return of its ``aggregate_fit`` (after unmasking); process CPU time (user + system, this process and its finished children) is
reported too, though Ray's workers are not its children and are not counted. Writes
``bench/results/secagg-flower.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
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
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=_TIMED), strategy=strategy)
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
        "cpu_s_server_process": round(marks["cpu_end"] - marks["cpu_start"], 3),
        "results": int(marks["results"]),
        "failures": int(marks["failures"]),
        "run_s": round(total, 1),
        "peak_rss_mb_server_process": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }


_TIMED = 2
"""The round timed: the first one starts Ray's actors and warms the nodes."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[10])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--shares", type=int)
    parser.add_argument("--threshold", type=int)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        n, p, s, k, t = (int(v) for v in args.case)
        print(json.dumps(_case(n, p, bool(s), k, t)))
        return
    target = Path(__file__).resolve().parents[1] / "results" / "secagg-flower.json"
    results: list[dict[str, Any]] = json.loads(target.read_text()) if target.exists() else []
    for nodes in args.nodes:
        shares = args.shares or (5 if nodes <= 10 else 15)
        threshold = args.threshold or (3 if nodes <= 10 else 8)
        for secure in (False, True):
            runs = []
            for _ in range(args.repeat):
                command = [sys.executable, __file__, "--case", str(nodes), str(args.params)]
                command += [str(int(secure)), str(shares), str(threshold)]
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout
                )
                if done.returncode != 0:
                    raise SystemExit(f"case {command[3:]} failed:\n{done.stderr[-4000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            runs.sort(key=lambda r: float(r["round_s"]))
            row = {**runs[len(runs) // 2], "round_s_all": [r["round_s"] for r in runs]}
            print(json.dumps(row), flush=True)
            key = (row["nodes"], row["params"], row["secagg"], row["num_shares"])
            results = [
                r
                for r in results
                if (r["nodes"], r["params"], r["secagg"], r["num_shares"]) != key
            ]
            results.append(row)
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
