"""The Stamen server of a SecAgg+ network run (``network.py``; Stamen's venv python).

Usage: ``server.py --clients N --model-bytes M --rounds R --out REPORT.json
[--shares K --threshold T] [--counter kernel] [--rest]``

``bench/flower_vs_stamen``'s Stamen server (``server_stamen.serve``: grpc-bidi and
grpc-rere on one port of 127.0.0.1, rest too with ``--rest``, ``PORT <n>`` printed once
listening) running FedAvg, or ``SecAggPlus(FedAvg)`` with ``--shares K --threshold T``,
over the nodes of ``flower_vs_stamen/clients.py`` (node ``k`` answers ``parameters + k``
with one example). So that SecAgg+ neither clips nor down-weights those updates, its
``max_weight`` is 1 (one example is a full weight) and its ``clipping_range`` the node
count (above every ``k``); neither changes its cost.

Each round is timed from the entry of ``configure_fit``, once every node is connected (so
SecAgg+'s key stages, which run inside it, are in the round), to the end of aggregation
(the accumulator's ``finish``: for SecAgg+, unmasking too). The server prints
``ROUND_START`` and ``ROUND_END`` at those points (the driver reads the node processes'
CPU then) and records its own CPU time over the round. The report is
``workload.server_report``'s plus ``secagg`` (the parameters) and ``bound_check``: the
largest difference between the aggregate and plain FedAvg's exact result, against
SecAgg+'s stated bound (``secagg_math.error_bound``) plus one float32 step per node
(plain FedAvg's own rounding: it folds the updates in float32).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flower_vs_stamen"))

import server_stamen
import workload

import stamen as fl
from stamen.protocol.secagg_math import error_bound
from stamen.server.strategy import FedAvg, SecAggPlus

QUANTIZATION_RANGE = 4194304
"""SecAggPlus's default ``quantization_range`` (2**22), named for the bound."""


class CpuClock(workload.RoundClock):
    """A round clock that also records this process's CPU time over each round and prints
    ``ROUND_START`` / ``ROUND_END`` as the round starts and ends."""

    _cpu_started = 0.0

    def start(self) -> None:
        """Start the round (counters, clock, CPU), then say so."""
        super().start()
        self._cpu_started = process_cpu()
        print("ROUND_START", flush=True)

    def stop(self, results: int, failures: int) -> None:
        """Say the round ended, then record it with its CPU time."""
        cpu = process_cpu() - self._cpu_started
        print("ROUND_END", flush=True)
        super().stop(results, failures)
        self.rounds[-1]["server_cpu_seconds"] = cpu


def process_cpu() -> float:
    """CPU seconds (user + system, every thread) this process has used so far."""
    used = workload.cpu_seconds()
    return used["user"] + used["system"]


def timed(base: type) -> type:
    """``base`` (FedAvg or SecAggPlus) timed by a :class:`CpuClock` from the entry of
    ``configure_fit``, every node connected, to the end of its accumulator's ``finish``."""

    class Timed(base):  # type: ignore[misc, valid-type]
        saved = None  # saves no model (workload.server_report)

        def __init__(self, clock: CpuClock, clients: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.clock = clock
            self.clients = clients
            self.final: list[bytes] | None = None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            if not client_manager.wait_for(self.clients, server_stamen.WAIT_FOR_CLIENTS):
                raise RuntimeError(
                    f"expected {self.clients} nodes within {server_stamen.WAIT_FOR_CLIENTS} "
                    f"s, {client_manager.num_available()} connected"
                )
            self.clock.start()
            return super().configure_fit(server_round, parameters, client_manager)

        def fit_accumulator(self, server_round: int) -> Any:
            inner = super().fit_accumulator(server_round)
            if inner is None:
                raise RuntimeError(f"{base.__name__} offered no accumulator: nothing to time")
            return server_stamen.timed_accumulator(self, inner, server_round)

    return Timed


def bound_check(report: dict[str, Any], args: Any, final: list[bytes] | None) -> dict[str, Any]:
    """The aggregate against plain FedAvg's exact result (``(clients - 1) / 2`` more every
    round, see ``workload``): within SecAgg+'s bound (none for plain FedAvg) plus one
    float32 step per node (FedAvg folds the updates in float32)."""
    expected = workload.expected_value(args.clients, args.rounds)
    step = float(np.spacing(np.float32(expected)))
    bound = 0.0
    if args.shares:
        bound = error_bound(
            [QUANTIZATION_RANGE] * args.clients,
            clipping_range=float(args.clients),
            quantization_range=QUANTIZATION_RANGE,
        )
    tolerance = bound + args.clients * step
    error = report["check"].get("max_abs_error")
    return {
        "ok": final is not None and error is not None and error <= tolerance,
        "max_abs_error": error,
        "bound": bound,
        "tolerance": tolerance,
    }


def strategy(args: Any, clock: CpuClock, initial: Any, save_dir: str) -> Any:
    """The timed strategy: FedAvg, or SecAggPlus around it with ``--shares``."""
    kwargs = workload.strategy_kwargs(args, initial, save_dir)
    if not args.shares:
        return timed(FedAvg)(clock, args.clients, **kwargs)
    return timed(SecAggPlus)(
        clock,
        args.clients,
        FedAvg(**kwargs),
        num_shares=args.shares,
        reconstruction_threshold=args.threshold,
        max_weight=1.0,
        clipping_range=float(args.clients),
        quantization_range=QUANTIZATION_RANGE,
    )


def main() -> int:
    """Serve, run the rounds, write the report."""
    parser = workload.server_parser(__doc__.splitlines()[0])
    parser.add_argument("--rest", action="store_true", help="serve the rest transport too")
    parser.add_argument("--shares", type=int, default=0, help="SecAgg+ num_shares (0: none)")
    parser.add_argument("--threshold", type=int, default=0, help="reconstruction_threshold")
    parser.add_argument(
        "--heartbeat-timeout", type=float, help="drop a node silent this long (default 45 s)"
    )
    args = parser.parse_args()
    if args.strategy != "fedavg":
        parser.error("only --strategy fedavg")

    clock = CpuClock(workload.wire_counter(args.counter), args.trace_rss, args.rounds)
    initial = fl.common.ndarrays_to_parameters(workload.initial_model(args.model_bytes))
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as save_dir:
        timed_strategy = strategy(args, clock, initial, save_dir)
        del initial
        report = server_stamen.serve(timed_strategy, clock, args)
    report["secagg"] = (
        {"num_shares": args.shares, "threshold": args.threshold} if args.shares else None
    )
    report["bound_check"] = bound_check(report, args, timed_strategy.final)
    workload.write_json(args.out, report)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
