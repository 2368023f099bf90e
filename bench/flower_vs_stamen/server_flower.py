"""The Flower 1.12 server of a benchmark run (run with the Flower venv's python).

Usage: ``server_flower.py --clients N --model-bytes M --rounds R --out REPORT.json
[--counter FILE] [--strategy fedavg|subclass|fedmedian|own]``

``flwr.server.start_server`` (grpc-bidi) with Flower's own strategy of the form asked for
(``workload.strategy_class``: FedAvg, a FedAvg subclass saving the model, FedMedian, a
Strategy of one's own), timed from ``configure_fit`` to the end of ``aggregate_fit``
(``workload.timed``), on 127.0.0.1 with a port chosen by the OS. Flower's address parser
refuses port 0 and Flower does not report the port it bound, so (as
``tests/interop/peers/flower_server.py`` does) Flower is handed a placeholder address that
is never bound: its "port in use" check skips the placeholder, gRPC's ``add_insecure_port``
binds 127.0.0.1:0 in its stead, and ``PORT <n>`` is printed once the gRPC server has
started. Everything else is Flower's default.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import flwr as fl
import grpc._server
import workload

PLACEHOLDER_ADDRESS = "127.0.0.1:65535"
REAL_ADDRESS = "127.0.0.1:0"


def listen_on_port_zero(bound: list[int]) -> None:
    """Make Flower's gRPC server bind 127.0.0.1:0, add the port to ``bound`` and print
    ``PORT <n>`` when started."""
    from flwr.server.superlink.fleet.grpc_bidi import grpc_server

    original_check = grpc_server.is_port_in_use

    def is_port_in_use(address: str) -> bool:
        return False if address == PLACEHOLDER_ADDRESS else original_check(address)

    grpc_server.is_port_in_use = is_port_in_use
    server_class = grpc._server._Server
    original_add = server_class.add_insecure_port
    original_start = server_class.start

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


def main() -> int:
    """Serve, run the rounds, write the report."""
    args = workload.server_parser(__doc__.splitlines()[0]).parse_args()
    clock = workload.RoundClock(workload.wire_counter(args.counter), args.trace_rss, args.rounds)
    initial = fl.common.ndarrays_to_parameters(workload.initial_model(args.model_bytes))
    timed = workload.timed(workload.strategy_class(fl, args.strategy))
    with tempfile.TemporaryDirectory(prefix="bench-saved-") as save_dir:
        strategy = timed(clock, **workload.strategy_kwargs(args, initial, save_dir))
        del initial
        listen_on_port_zero(clock.counter.ports)
        started_rss = workload.current_rss_bytes()
        fl.server.start_server(
            server_address=PLACEHOLDER_ADDRESS,
            config=fl.server.ServerConfig(num_rounds=args.rounds),
            strategy=strategy,
        )
        report = workload.server_report("flower", clock, strategy, args, started_rss)
    workload.write_json(args.out, report)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
