"""Scale on the default (threads) backend: 1,000 virtual clients with flat memory, 10,000
registered ones with 1 % sampled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import sim_digits

import stamen as fl
from stamen.simulation import start_simulation

PROBE = Path(__file__).with_name("sim_memory_probe.py")
MIB = 1024


def _probe(num_clients: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(PROBE), str(num_clients)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_thousand_virtual_clients_train_with_flat_memory() -> None:
    """1,000 clients, 10 rounds, 10 % sampled, on the digits model: every round trains, the
    model learns, the thread count stays bounded, and the run's peak memory above its start
    is small and grows little from 100 to 1,000 clients (no client is kept alive)."""
    small, large = _probe(100), _probe(1000)
    for run in (small, large):
        assert run["fit_rounds"] == 10
        assert run["threads_max"] <= (os.cpu_count() or 1) + 3
    assert large["final_accuracy"] > 0.8
    growth_small = small["peak_kb"] - small["rss_before_kb"]
    growth_large = large["peak_kb"] - large["rss_before_kb"]
    assert growth_large < 32 * MIB, (small, large)
    assert growth_large - growth_small < 16 * MIB, (small, large)


def test_ten_thousand_registered_virtual_clients_with_one_percent_sampled() -> None:
    """10,000 registered clients, fraction_fit=0.01: 100 clients train in each round."""
    final = sim_digits.FinalParameters()
    history = start_simulation(
        client_fn=sim_digits.client_fn,
        num_clients=10_000,
        config=fl.server.ServerConfig(num_rounds=3),
        strategy=sim_digits.strategy(final, fraction=0.01),
        client_manager=fl.server.SimpleClientManager(seed=0),
    )
    assert history.metrics_distributed_fit["clients"] == [(1, 100), (2, 100), (3, 100)]
    assert [r for r, _ in history.losses_distributed] == [1, 2, 3]
    assert final.accuracy[3] > final.accuracy[0]
