"""One benchmark case in its own process: prints one JSON line.

Usage: ``case.py FRAMEWORK BACKEND NUM_CLIENTS NUM_ROUNDS FRACTION``, with FRAMEWORK
``stamen`` or ``flwr`` (run by the matching virtualenv's python) and BACKEND ``threads``
or ``ray`` (Flower 1.12 has only ``ray``). ``$PYTHONPATH`` must hold this directory (Ray
workers import ``workload`` by name) and ``$STAMEN_BENCH_DIGITS`` the data set.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def main() -> None:
    """Run the case; print its figures as JSON."""
    framework, backend = sys.argv[1], sys.argv[2]
    num_clients, num_rounds, fraction = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    os.environ["STAMEN_BENCH_FRAMEWORK"] = framework
    import workload  # after the framework is chosen

    fl = workload.fl
    workload.digits()
    accuracy: dict[int, float] = {}
    strategy = workload.make_strategy(fraction, accuracy)
    kwargs = {}
    if framework == "stamen":
        kwargs["backend"] = backend
    elif backend != "ray":
        raise SystemExit("Flower 1.12's start_simulation runs only on Ray")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # VmHWM := VmRSS: the peak is the run's, not the imports'
    except OSError:
        pass
    rss_before = _status_kb("VmRSS")
    started = time.monotonic()
    fl.simulation.start_simulation(
        client_fn=workload.client_fn,
        num_clients=num_clients,
        config=fl.server.ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
        client_resources={"num_cpus": 1},
        **kwargs,
    )
    ended = time.monotonic()
    first = strategy.first_round_at or started
    print(
        json.dumps(
            {
                "framework": framework,
                "backend": backend,
                "clients": num_clients,
                "rounds": num_rounds,
                "fraction": fraction,
                "client_rounds": strategy.fit_results,
                "fit_failures": strategy.fit_failures,
                "total_seconds": ended - started,
                "startup_seconds": first - started,
                "round_seconds": ended - first,
                "driver_rss_before_kb": rss_before,
                "driver_peak_kb": _status_kb("VmHWM"),
                "final_accuracy": accuracy.get(num_rounds),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
