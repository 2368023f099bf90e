"""Run the digits simulation in a fresh process and report its memory, as JSON.

Usage: ``python sim_memory_probe.py NUM_CLIENTS [NUM_ROUNDS] [FRACTION]``. The peak
resident set (``VmHWM``) is reset just before ``start_simulation`` (``/proc/self/clear_refs``),
so the figure is the run's own peak, not that of the imports.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import sim_digits

import stamen as fl
from stamen.simulation import start_simulation


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def main() -> None:
    """Run and print ``{"clients", "rss_before_kb", "peak_kb", "threads_max", ...}``."""
    num_clients = int(sys.argv[1])
    num_rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    fraction = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
    sim_digits.digits()  # load the data set before measuring
    threads_max = threading.active_count()

    final = sim_digits.FinalParameters()
    base = sim_digits.strategy(final, fraction=fraction)
    aggregate_fit = base.aggregate_fit

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal threads_max
        threads_max = max(threads_max, threading.active_count())
        return aggregate_fit(*args, **kwargs)

    base.aggregate_fit = counting  # type: ignore[method-assign]
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    rss_before = _status_kb("VmRSS")
    started = time.monotonic()
    history = start_simulation(
        client_fn=sim_digits.client_fn,
        num_clients=num_clients,
        config=fl.server.ServerConfig(num_rounds=num_rounds),
        strategy=base,
        client_manager=fl.server.SimpleClientManager(seed=0),
    )
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "clients": num_clients,
                "rounds": num_rounds,
                "rss_before_kb": rss_before,
                "peak_kb": _status_kb("VmHWM"),
                "threads_max": threads_max,
                "seconds": elapsed,
                "final_accuracy": final.accuracy[num_rounds],
                "fit_rounds": len(history.metrics_distributed_fit.get("max_fits", [])),
            }
        )
    )


if __name__ == "__main__":
    main()
