"""A Flower 1.12 ``start_simulation`` script runs unchanged after ``import stamen as fl``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sim_flower_script.py")

# What Flower 1.12's own start_simulation prints for this script (on Ray), for both
# client_fn styles: the bench (bench/simulation) runs it side by side to re-check.
FLOWER_OUTPUT = "LOSSES [(1, 14.0), (2, 28.0), (3, 42.0)]\nROUNDS 3\n"


@pytest.mark.parametrize("style", ["context", "legacy"])
def test_flower_simulation_script_runs_unchanged(style: str) -> None:
    """The script (NumPyClient, client_fn(context) or legacy client_fn(cid: str), FedAvg,
    ServerConfig, client_resources) runs as a program and prints what Flower prints."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), style],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == FLOWER_OUTPUT
