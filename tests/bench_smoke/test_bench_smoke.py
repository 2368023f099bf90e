"""Smoke test of the Stamen-vs-Flower benchmark harness (``bench/flower_vs_stamen``).

Runs the driver in ``--quick`` mode (tiny sizes) on workload A, for Stamen and for real
Flower 1.12 (its own virtualenv), and checks that both runs completed and were checked.
It tests the harness, not performance: nothing here is timed against a bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "bench" / "flower_vs_stamen" / "run.py"

pytestmark = pytest.mark.interop


def flower_python() -> Path:
    """Flower's interpreter: ``$STAMEN_FLWR_PYTHON``, else ``.venv-flwr`` (fail if absent)."""
    configured = os.environ.get("STAMEN_FLWR_PYTHON")
    python = Path(configured) if configured else REPO / ".venv-flwr" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} does not exist: run `make interop-venv`", pytrace=False)
    return python


@pytest.mark.parametrize("wire", ["kernel", "relay"])
def test_quick_workload_a_runs_on_both_frameworks(tmp_path: Path, wire: str) -> None:
    """``run.py --quick --workloads A`` runs A on Stamen and on Flower, each run's final
    model passes the check, and the JSON holds round times, RSS and wire bytes for both;
    the bytes, counted by the kernel or by a relay, are the models both ways plus framing."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            "--quick",
            "--workloads",
            "A",
            "--flower-python",
            str(flower_python()),
            "--out",
            str(out),
            "--wire",
            wire,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    runs = result["workloads"]["A"]["runs"]
    assert sorted(runs) == ["flower", "stamen"]
    for framework, framework_runs in runs.items():
        [run] = framework_runs
        assert run["ok"], (framework, run.get("error"))
        assert run["check"]["ok"] and run["check"]["max_abs_error"] <= 1e-3, run["check"]
        assert len(run["round_seconds"]) == result["workloads"]["A"]["spec"]["rounds"]
        spec = result["workloads"]["A"]["spec"]
        payload = 2 * spec["clients"] * spec["model_bytes"]
        # A relay counts bytes as it forwards them, so a busy machine can push a few KB of
        # one round into the next round's count: 10 % either way, and 20 % over in all.
        assert all(0.9 * payload < b < 1.2 * payload for b in run["wire_bytes"]), run["wire_bytes"]
        rounds = len(run["wire_bytes"])
        assert rounds * payload * 0.97 < sum(run["wire_bytes"]) < 1.2 * rounds * payload
        assert run["wire_connections_lost"] == 0
        assert run["server_peak_rss_bytes"] > 0 and min(run["client_peak_rss_bytes"]) > 0
    ratio = result["workloads"]["A"]["summary"]["ratio"]
    assert ratio["round_seconds"] is not None and ratio["wire_bytes"] is not None
    assert "| A: 4 x 40 KB" in done.stdout
