"""A real Flower 1.12 server for the interop tests (run only by the Flower venv's python).

Usage: ``flower_server.py --out RESULT.json --initial {given,client}``

Runs ``flwr.server.start_server`` on 127.0.0.1 port 0 with a FedAvg configured by
``scenario``. Flower 1.12 neither accepts port 0 (its address parser wants 1..65535) nor
reports the port it bound, so (see :func:`listen_on_port_zero`) Flower is given a
placeholder address that is never bound, and gRPC's server class is wrapped:
``add_insecure_port`` binds port 0 instead of the placeholder and records the port, and once
the server has started the line ``PORT <n>`` is printed (flushed) on stdout.

At the end the per-round aggregated parameters (recorded inside the strategy, the only
place Flower keeps them), the History, the number of failures per round and each client's
DisconnectRes to the final ReconnectIns are written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import flwr as fl
import grpc._server
import scenario
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

# Flower sees this address, which nothing ever binds: see listen_on_port_zero().
PLACEHOLDER_ADDRESS = "127.0.0.1:65535"
REAL_ADDRESS = "127.0.0.1:0"


def listen_on_port_zero() -> None:
    """Make Flower's gRPC server listen on 127.0.0.1 port 0 and print ``PORT <n>`` on start.

    Flower checks the placeholder with ``is_port_in_use`` (by binding it) and then calls
    ``grpc.Server.add_insecure_port`` with it. The check is skipped for the placeholder
    only, and ``add_insecure_port`` binds :data:`REAL_ADDRESS` in its stead.
    """
    flower_bidi = grpc_bidi_server_module()
    original_check = flower_bidi.is_port_in_use

    def is_port_in_use(address: str) -> bool:
        return False if address == PLACEHOLDER_ADDRESS else original_check(address)

    flower_bidi.is_port_in_use = is_port_in_use

    server_class = grpc._server._Server
    original_add = server_class.add_insecure_port
    original_start = server_class.start
    bound: list[int] = []

    def add_insecure_port(self: Any, address: str) -> int:
        port = original_add(self, REAL_ADDRESS if address == PLACEHOLDER_ADDRESS else address)
        bound.append(port)
        return port

    def start(self: Any) -> None:
        original_start(self)
        for port in bound:
            print(f"PORT {port}", flush=True)

    server_class.add_insecure_port = add_insecure_port
    server_class.start = start


def grpc_bidi_server_module() -> Any:
    """Flower's module that builds the grpc-bidi server (it imports ``is_port_in_use``)."""
    from flwr.server.superlink.fleet.grpc_bidi import grpc_server

    if not hasattr(grpc_server, "is_port_in_use"):
        raise RuntimeError("this Flower has no grpc_server.is_port_in_use: not Flower 1.12?")
    return grpc_server


def record_disconnects(sink: list[dict[str, str]]) -> None:
    """Record each client's answer to the final ReconnectIns (Flower itself drops them).

    ``Server.disconnect_all_clients`` sends ``ReconnectIns`` through the module-level
    ``reconnect_client`` of ``flwr.server.server`` and discards the DisconnectRes.
    """
    from flwr.server import server as flower_server

    original = flower_server.reconnect_client

    def reconnect_client(client: Any, reconnect: Any, timeout: Any) -> Any:
        try:
            proxy, disconnect = original(client, reconnect, timeout)
        except Exception as exc:
            sink.append({"error": repr(exc)})
            raise
        sink.append({"reason": str(disconnect.reason)})
        return proxy, disconnect

    flower_server.reconnect_client = reconnect_client


class RecordingFedAvg(fl.server.strategy.FedAvg):
    """Flower's FedAvg, keeping each round's aggregate and failure counts."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict[str, Any]] = []
        self.fit_failures: list[int] = []
        self.evaluate_failures: list[int] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.fit_failures.append(len(failures))
        if parameters is not None:
            arrays = parameters_to_ndarrays(parameters)
            self.rounds.append(
                {"round": server_round, "params": [scenario.encode_ndarray(a) for a in arrays]}
            )
        return parameters, metrics

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        self.evaluate_failures.append(len(failures))
        return super().aggregate_evaluate(server_round, results, failures)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--initial", choices=("given", "client"), required=True)
    parser.add_argument("--round-timeout", type=float, default=30.0)
    args = parser.parse_args()

    initial = None
    if args.initial == "given":
        initial = ndarrays_to_parameters(scenario.initial_ndarrays())
    strategy = RecordingFedAvg(
        min_fit_clients=len(scenario.CLIENT_IDS),
        min_evaluate_clients=len(scenario.CLIENT_IDS),
        min_available_clients=len(scenario.CLIENT_IDS),
        initial_parameters=initial,
        on_fit_config_fn=scenario.fit_config,
        on_evaluate_config_fn=scenario.evaluate_config,
        fit_metrics_aggregation_fn=scenario.aggregate_fit_metrics,
        evaluate_metrics_aggregation_fn=scenario.aggregate_evaluate_metrics,
    )
    listen_on_port_zero()
    disconnects: list[dict[str, str]] = []
    record_disconnects(disconnects)
    history = fl.server.start_server(
        server_address=PLACEHOLDER_ADDRESS,
        config=fl.server.ServerConfig(
            num_rounds=scenario.NUM_ROUNDS, round_timeout=args.round_timeout
        ),
        strategy=strategy,
    )
    result = {
        "rounds": strategy.rounds,
        "fit_failures": strategy.fit_failures,
        "evaluate_failures": strategy.evaluate_failures,
        "disconnects": disconnects,
        "losses_distributed": [[r, loss] for r, loss in history.losses_distributed],
        "metrics_distributed_fit": scenario.encode_metrics(history.metrics_distributed_fit),
        "metrics_distributed": scenario.encode_metrics(history.metrics_distributed),
    }
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(result), encoding="utf-8")
    os.replace(partial, args.out)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
