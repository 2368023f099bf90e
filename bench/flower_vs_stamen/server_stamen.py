"""The Stamen server of a benchmark run (run with the Stamen venv's python).

Usage: ``server_stamen.py --clients N --model-bytes M --rounds R --out REPORT.json
[--counter FILE] [--rest] [--strategy fedavg|subclass|fedmedian|own] [--authorized-keys PEM]``

Serves grpc-bidi and grpc-rere (and, with ``--rest``, rest) on 127.0.0.1, ports chosen by
the OS, prints ``PORT <n>`` (and ``REST_PORT <n>``) once listening, runs ``R`` rounds of
the strategy form asked for (``workload.strategy_class``: FedAvg, a FedAvg subclass saving
the model, FedMedian, a Strategy of one's own) over ``N`` clients starting from a zero
model of ``M`` bytes, and writes the report of ``workload.server_report`` (round times,
bytes on the wire per round, the check of the final model, peak RSS) to ``--out``. With
``--authorized-keys`` only nodes holding one of those keys are served (node
authentication).

Every node of a benchmark comes from 127.0.0.1, so the Fleet limits meant for one address
are lifted (:func:`bench_timing`): no registration rate limit, and REST connections per
address up to the node count plus a margin (a rest node holds one connection).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from typing import Any

import workload

import stamen as fl
from stamen.client.app import GRPC_MAX_MESSAGE_LENGTH
from stamen.server.app import init_defaults, make_authenticator, run_server
from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet.handler import FleetTiming
from stamen.server.fleet.service import FleetService

WAIT_FOR_CLIENTS = 900.0
CONNECTION_MARGIN = 1024


def bench_timing(clients: int, heartbeat_timeout: float | None = None) -> FleetTiming:
    """Fleet limits for ``clients`` nodes that all come from one address (see above);
    ``heartbeat_timeout``: the silence after which a busy node is dropped (None: 45 s)."""
    connections = clients + CONNECTION_MARGIN
    return FleetTiming(
        heartbeat_timeout=heartbeat_timeout,
        create_node_rate=None,
        create_node_global_rate=None,
        max_connections=connections,
        max_connections_per_peer=connections,
    )


class TimedFedAvg(workload.clocked(fl.server.strategy.FedAvg)):  # type: ignore[misc]
    """Stamen's FedAvg, timing each round and keeping the last aggregated model.

    Stamen's FedAvg aggregates each result as it arrives (``fit_accumulator``); the clock's
    "aggregation" is the end of it, once every reply is in (``finish``). Overriding
    ``aggregate_fit`` to time it would turn the streaming off (see ``workload.timed``).
    """

    def fit_accumulator(self, server_round: int) -> Any:
        """FedAvg's streaming accumulator, with the clock stopped when it finishes."""
        inner = super().fit_accumulator(server_round)
        if inner is None:
            raise RuntimeError("FedAvg offered no streaming accumulator")
        return timed_accumulator(self, inner, server_round)


def timed_accumulator(strategy: Any, inner: Any, server_round: int) -> Any:
    """``inner``, a round's streaming accumulator, whose ``finish`` stops the clock of
    ``strategy`` (a ``workload.clocked`` strategy) once every reply is in, and keeps the
    last round's model in ``strategy.final``."""
    return TimedAccumulator(strategy, inner, strategy.clock.is_last(server_round))


class TimedAccumulator:
    """A streaming accumulator that counts the results it passes on and stops the round's
    clock when it finishes (see :func:`timed_accumulator`).

    A class of its own, not one made per round: a class object is always part of a
    reference cycle, so a per-round class holding the round's accumulator (and with it
    every result's metadata) left it all to Python's cyclic garbage collector, whose
    full collections of it took ~25 ms each in the middle of later rounds.
    """

    def __init__(self, strategy: Any, inner: Any, last: bool) -> None:
        self.strategy, self.inner, self.last = strategy, inner, last
        self.added = 0

    def add(self, client: Any, res: Any) -> None:
        self.added += 1
        self.inner.add(client, res)

    def finish(self, failures: Any) -> Any:
        clock = self.strategy.clock
        clock.aggregating()
        parameters, metrics = self.inner.finish(failures)
        clock.stop(self.added, len(failures))
        if parameters is not None and self.last:
            self.strategy.final = parameters.tensors
        return parameters, metrics


def report_connections(manager: SimpleClientManager, clock: workload.RoundClock) -> None:
    """Log how many clients are connected, every 5 s until the first round starts."""

    def watch() -> None:
        while not clock.marks:
            print(f"connected: {manager.num_available()}", file=sys.stderr, flush=True)
            time.sleep(5)

    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    """Serve, run the rounds, write the report."""
    parser = workload.server_parser(__doc__.splitlines()[0])
    parser.add_argument("--rest", action="store_true", help="serve the rest transport too")
    parser.add_argument(
        "--authorized-keys", default=None, help="PEM file of the nodes' public keys"
    )
    args = parser.parse_args()

    clock = workload.RoundClock(workload.wire_counter(args.counter), args.trace_rss, args.rounds)
    initial = fl.common.ndarrays_to_parameters(workload.initial_model(args.model_bytes))
    with tempfile.TemporaryDirectory(prefix="bench-saved-") as save_dir:
        timed = strategy_class(args.strategy)
        strategy = timed(clock, **workload.strategy_kwargs(args, initial, save_dir))
        del initial
        report = serve(strategy, clock, args)
    workload.write_json(args.out, report)
    print("DONE", flush=True)
    return 0


def strategy_class(form: str) -> type:
    """The timed strategy class of ``form``: FedAvg streams, the others collect."""
    if form == "fedavg":
        return TimedFedAvg
    return workload.timed(workload.strategy_class(fl, form))


def serve(strategy: Any, clock: workload.RoundClock, args: Any) -> dict[str, Any]:
    """Serve, run the rounds; the report."""
    server, config = init_defaults(
        None,
        fl.server.ServerConfig(num_rounds=args.rounds),
        strategy,
        SimpleClientManager(wait_timeout=WAIT_FOR_CLIENTS),
    )
    authenticator = make_authenticator(getattr(args, "authorized_keys", None), 60.0)
    service = FleetService(
        server.client_manager(),
        address="127.0.0.1:0",
        max_message_length=GRPC_MAX_MESSAGE_LENGTH,
        rest_address="127.0.0.1:0" if args.rest else None,
        timing=bench_timing(args.clients, getattr(args, "heartbeat_timeout", None)),
        authenticator=authenticator,
    )
    port = service.start()
    clock.counter.ports = [port] if service.rest_port is None else [port, service.rest_port]
    report_connections(server.client_manager(), clock)
    started_rss = workload.current_rss_bytes()
    print(f"PORT {port}", flush=True)
    if service.rest_port is not None:
        print(f"REST_PORT {service.rest_port}", flush=True)
    try:
        run_server(server, config)
    finally:
        service.stop()
    report = workload.server_report("stamen", clock, strategy, args, started_rss)
    # Every node served was checked against these keys (the server refuses any other).
    report["authorized_keys"] = 0 if authenticator is None else len(authenticator.keys)
    return report


if __name__ == "__main__":
    sys.exit(main())
