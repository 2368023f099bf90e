"""The default backend isolates virtual clients as Flower's Ray actors do: a Flower script
that keeps its model in a module global trains as it trains on Flower."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("sim_module_global_script.py")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sim_module_global_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flower_losses() -> list[float]:
    """What Flower computes for the script: each client trains alone from the global model
    (one client at a time per Ray actor), FedAvg by examples, losses averaged by examples.
    A sequential pure NumPy computation (Flower's Ray simulation is too heavy for CI; the
    bench, bench/simulation, runs the script under Flower and compares)."""
    app = load_script()
    weights = np.zeros(3)
    losses = []
    n = [len(y) for y in app.TARGETS]
    for _ in range(app.NUM_ROUNDS):
        models = []
        for pid in range(app.NUM_CLIENTS):
            w = weights.copy()
            x, y = app.FEATURES[pid], app.TARGETS[pid]
            for _ in range(app.STEPS):
                w = w - app.LEARNING_RATE * (x.T @ (x @ w - y) / len(y))
            models.append(w)
        weights = sum(k * m for k, m in zip(n, models, strict=True)) / sum(n)
        per_client = [
            float(np.mean((x @ weights - y) ** 2))
            for x, y in zip(app.FEATURES, app.TARGETS, strict=True)
        ]
        losses.append(sum(k * v for k, v in zip(n, per_client, strict=True)) / sum(n))
    return losses


def run_script(*args: str) -> list[float]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOSSES "))
    return [float(loss) for _, loss in ast.literal_eval(line[len("LOSSES ") :])]


def test_a_module_global_model_trains_as_on_flower_with_the_default_backend() -> None:
    """No backend given: the losses are Flower's (each client alone with the module's
    model), to 1e-9."""
    np.testing.assert_allclose(run_script(), flower_losses(), rtol=1e-9)


@pytest.mark.parametrize("backend", ["processes", "sequential"])
def test_the_isolating_backends_agree(backend: str) -> None:
    """Named explicitly, the processes and sequential backends give Flower's losses too."""
    np.testing.assert_allclose(run_script(backend), flower_losses(), rtol=1e-9)
