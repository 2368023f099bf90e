"""Smoke test of the Stamen-vs-Flower benchmark harness (``bench/flower_vs_stamen``).

Runs the driver in ``--quick`` mode (tiny sizes) for Stamen and for real Flower 1.12 (its
own virtualenv): workload A, and B in the strategy forms that collect a round's results
(a FedAvg subclass saving the model, FedMedian, a Strategy of one's own); checks that
every run completed and was checked, and that the report relates each round to the
machine's floor. It tests the harness, not performance: nothing here is timed against a
bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def run_quick(tmp_path: Path, workloads: str, wire: str) -> tuple[dict[str, Any], str]:
    """``run.py --quick`` of ``workloads`` on both frameworks: its JSON and its stdout."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            "--quick",
            "--workloads",
            workloads,
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
    return json.loads(out.read_text(encoding="utf-8")), done.stdout


@pytest.mark.parametrize("wire", ["kernel", "relay"])
def test_quick_workload_a_runs_on_both_frameworks(tmp_path: Path, wire: str) -> None:
    """``run.py --quick --workloads A`` runs A on Stamen and on Flower, each run's final
    model passes the check, and the JSON holds round times, RSS and wire bytes for both;
    the bytes, counted by the kernel or by a relay, are the models both ways plus framing."""
    result, stdout = run_quick(tmp_path, "A", wire)
    runs = result["workloads"]["A"]["runs"]
    assert sorted(runs) == ["flower", "stamen"]
    for framework, framework_runs in runs.items():
        [run] = framework_runs
        assert run["ok"], (framework, run.get("error"))
        assert run["check"]["ok"] and run["check"]["max_abs_error"] <= 1e-3, run["check"]
        assert len(run["round_seconds"]) == result["workloads"]["A"]["spec"]["rounds"]
        spec = result["workloads"]["A"]["spec"]
        payload = 2 * spec["clients"] * spec["model_bytes"]
        # A relay counts bytes as it forwards them, so on a busy machine part of one
        # round's traffic (up to a model in flight: 12.5 % of this payload) lands in the
        # next round's count: each round within a model (and 10 %) of the payload; the
        # rounds together within 3 % under and 20 % over.
        slack = 1.1 * spec["model_bytes"]
        counts = run["wire_bytes"]
        assert all(payload - slack < b < 1.2 * payload + slack for b in counts), counts
        rounds = len(run["wire_bytes"])
        assert rounds * payload * 0.97 < sum(run["wire_bytes"]) < 1.2 * rounds * payload
        assert run["wire_connections_lost"] == 0
        assert run["server_peak_rss_bytes"] > 0 and min(run["client_peak_rss_bytes"]) > 0
    ratio = result["workloads"]["A"]["summary"]["ratio"]
    assert ratio["round_seconds"] is not None and ratio["wire_bytes"] is not None
    assert "| A: 4 x 40 KB" in stdout


def test_quick_strategy_forms_run_on_both_frameworks_against_the_floor(tmp_path: Path) -> None:
    """``Bsub`` (a FedAvg subclass overriding ``aggregate_fit`` to save the model with
    ``np.savez``), ``Bmed`` (FedMedian) and ``Bown`` (a ``Strategy`` of one's own, written
    as Flower's FedAvg is) run on both frameworks and end at the expected model; the
    subclass saved one file per round, the last one the final model. The floors are
    measured, and each round is a multiple (> 1: the floor is a lower bound) of its
    workload's floor."""
    result, stdout = run_quick(tmp_path, "Bsub,Bmed,Bown", "none")
    floors = result["floors"]
    assert floors["loopback_bytes_per_s"] > 0 and floors["memcpy_bytes_per_s"] > 0
    for name, form in (("Bsub", "subclass"), ("Bmed", "fedmedian"), ("Bown", "own")):
        entry = result["workloads"][name]
        assert entry["spec"]["strategy"] == form
        clients, model_bytes = entry["spec"]["clients"], entry["spec"]["model_bytes"]
        assert entry["floor"]["loopback_bytes"] == 2 * clients * model_bytes
        assert entry["floor"]["memcpy_bytes"] == clients * model_bytes
        for framework, [run] in entry["runs"].items():
            assert run["ok"], (name, framework, run.get("error"))
            assert run["check"]["ok"] and run["check"]["max_abs_error"] <= 1e-3, run["check"]
            saved = run["check"].get("saved")
            if form == "subclass":
                assert saved is not None and saved["ok"], saved
                assert saved["file"] == f"round-{entry['spec']['rounds']}.npz"
            else:
                assert saved is None
            multiples = entry["floor"][framework]
            assert multiples["round_x_floor"] > 1, (name, framework, entry["floor"])
            assert multiples["server_peak_rss_x_model"] > 1
    assert "| Bsub: 4 x 1 MB, FedAvg subclass saving the model |" in stdout
    assert "| Bmed: 4 x 1 MB, FedMedian |" in stdout
    assert "| Bown: 4 x 1 MB, a Strategy of one's own |" in stdout


def test_quick_transport_points_are_compared_with_grpc_bidi(tmp_path: Path) -> None:
    """``A-rere`` and ``A-rest`` run A's federation with Stamen's grpc-rere and rest nodes
    (Stamen only: Flower's legacy server speaks grpc-bidi), end at the expected model, and
    the report compares each one's round time with A's on grpc-bidi."""
    result, stdout = run_quick(tmp_path, "A,A-rere,A-rest", "none")
    for name, transport in (("A-rere", "grpc-rere"), ("A-rest", "rest")):
        entry = result["workloads"][name]
        assert entry["spec"]["transport"] == transport
        assert set(entry["runs"]) == {"stamen"}
        [run] = entry["runs"]["stamen"]
        assert run["ok"] and run["check"]["ok"], run.get("error")
        [target] = [t for t in result["targets"] if t["target"].startswith(f"{name} round time <=")]
        assert target["met"] in (True, False), target
        other = entry["summary"]["stamen"]["round_seconds"]
        bidi = result["workloads"]["A"]["summary"]["stamen"]["round_seconds"]
        assert target["measured"].startswith(f"{other / bidi:.2f} x"), target
    assert "A-rere round time <= 1.3 x A (grpc-bidi)" in stdout
    # grpcio alone ran A's exchange both ways before the runs, and the report shows it.
    floor = result["grpc_floors"]["A"]
    assert floor["ok"], floor
    assert floor["bidi"]["median_round_seconds"] > 0 and floor["rere"]["median_round_seconds"] > 0
    assert "grpcio alone, A's exchange: a stream message each way" in stdout
    [row] = [line for line in stdout.splitlines() if line.startswith("| A | ")]
    rere = result["workloads"]["A-rere"]["summary"]["stamen"]["round_seconds"]
    assert row.endswith(f"| {rere / floor['rere']['median_round_seconds']:.2f} x |"), row


def test_quick_auth_point_runs_authenticated_nodes_against_a(tmp_path: Path) -> None:
    """``A-auth`` runs A's federation (Stamen only, grpc-bidi) with a key pair per node
    and the server holding their keys, ends at the expected model, and the report
    compares its round time with A's."""
    result, stdout = run_quick(tmp_path, "A,A-auth", "none")
    entry = result["workloads"]["A-auth"]
    assert entry["spec"]["auth"] is True and entry["spec"]["transport"] == "grpc-bidi"
    assert set(entry["runs"]) == {"stamen"}
    [run] = entry["runs"]["stamen"]
    assert run["ok"] and run["check"]["ok"], run.get("error")
    assert run["authorized_keys"] == entry["spec"]["clients"]  # one key per node, enforced
    [plain] = result["workloads"]["A"]["runs"]["stamen"]
    assert plain["authorized_keys"] == 0
    [target] = [t for t in result["targets"] if t["target"].startswith("A-auth round time /")]
    assert target["met"] is None, target  # reported, not bounded
    ratio = (
        entry["summary"]["stamen"]["round_seconds"]
        / (result["workloads"]["A"]["summary"]["stamen"]["round_seconds"])
    )
    assert target["measured"].startswith(f"{ratio:.2f} x"), target
    assert "| A-auth round time / A (what node authentication costs) | " in stdout
