"""A model past gRPC's 2 GB ceiling, trained over each transport with default settings.

Usage::

    .venv/bin/python bench/large_model.py                  # 3 GB, every transport
    .venv/bin/python bench/large_model.py --gb 0.5 --transports rest

For each transport, one server process (FedAvg, one round, a float32 model of ``--gb``
GB in three tensors, default ``grpc_max_message_length``) and one node process (its
NumPyClient adds 1 in place) run on 127.0.0.1. The server checks that the new model is
the old one plus 1 everywhere. Each process reports its peak RSS (VmHWM); the table gives
them as multiples of the model size. Results go to bench/results/large_model.json.
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

import numpy as np

import stamen as fl
from stamen.client.app import GRPC_MAX_MESSAGE_LENGTH
from stamen.ndarrays import parameters_to_views
from stamen.server.app import run_server
from stamen.server.fleet.service import FleetService

HERE = Path(__file__).resolve().parent
TRANSPORTS = ("grpc-bidi", "grpc-rere", "rest")
LAYERS = 3


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model(total_bytes: int) -> list[np.ndarray]:
    per_layer = total_bytes // 4 // LAYERS
    return [np.full(per_layer, float(i), dtype=np.float32) for i in range(LAYERS)]


class _Plus1(fl.client.NumPyClient):
    def fit(self, parameters: Any, config: Any) -> Any:
        for array in parameters:
            array += 1  # in place: the node holds one copy of the model it trains
        return parameters, 1, {}


def serve(args: argparse.Namespace) -> None:
    """Run one FedAvg round and check the result (server process)."""
    total = int(args.gb * 1e9)
    start = fl.common.ndarrays_to_parameters(_model(total))
    model_bytes = sum(len(t) for t in start.tensors)
    result: dict[str, Any] = {}

    class Checked(fl.server.strategy.FedAvg):
        def fit_accumulator(self, server_round: int) -> Any:
            result["round_start"] = time.monotonic()
            return super().fit_accumulator(server_round)

    strategy = Checked(
        initial_parameters=start,
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        fraction_evaluate=0.0,
    )
    del start
    server = fl.server.Server(client_manager=fl.server.SimpleClientManager(), strategy=strategy)
    service = FleetService(
        server.client_manager(),
        address="127.0.0.1:0",
        rest_address="127.0.0.1:0",
        max_message_length=GRPC_MAX_MESSAGE_LENGTH,
    )
    service.start()
    port = service.rest_port if args.transport == "rest" else service.port
    print(f"PORT {port}", flush=True)
    try:
        run_server(server, fl.server.ServerConfig(num_rounds=1))
    finally:
        service.stop()
    round_seconds = time.monotonic() - result["round_start"]
    arrays = parameters_to_views(server.parameters)  # the check copies nothing
    ok = all(bool(np.all(a == i + 1)) for i, a in enumerate(arrays))
    json.dump(
        {"ok": ok, "round_seconds": round_seconds, "peak_rss": _peak_rss(), "model": model_bytes},
        sys.stdout,
    )


def node(args: argparse.Namespace) -> None:
    """Train as one node until the run ends (node process)."""
    address = f"127.0.0.1:{args.port}"
    if args.transport == "rest":
        address = f"http://{address}"
    fl.client.start_client(
        server_address=address, client=_Plus1().to_client(), transport=args.transport
    )
    json.dump({"peak_rss": _peak_rss()}, sys.stdout)


def run(args: argparse.Namespace) -> None:
    """Both processes per transport; print and save the table."""
    rows = []
    for transport in args.transports.split(","):
        me = [sys.executable, str(Path(__file__).resolve())]
        server = subprocess.Popen(
            [*me, "serve", "--transport", transport, "--gb", str(args.gb)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            server.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        began = time.monotonic()
        client = subprocess.run(
            [*me, "node", "--transport", transport, "--port", line.split()[1]],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
        out, _ = server.communicate(timeout=args.timeout)
        if client.returncode or server.returncode:
            raise RuntimeError(
                f"{transport}: node {client.stderr[-2000:]} server rc {server.returncode}"
            )
        srv, cli = json.loads(out), json.loads(client.stdout)
        model = srv["model"]
        row = {
            "transport": transport,
            "model_bytes": model,
            "ok": srv["ok"],
            "round_seconds": round(srv["round_seconds"], 2),
            "run_seconds": round(time.monotonic() - began, 2),
            "server_peak_rss_x_model": round(srv["peak_rss"] / model, 2),
            "node_peak_rss_x_model": round(cli["peak_rss"] / model, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    out_file = HERE / "results" / "large_model.json"
    out_file.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "serve", "node"))
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--transport", default="grpc-bidi")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    {"run": run, "serve": serve, "node": node}[args.mode](args)


if __name__ == "__main__":
    main()
