"""The bench's result checks and floor arithmetic (``bench/flower_vs_stamen``), no servers.

The check of a saved model must fail on a wrong one, or a saving strategy that saved the
wrong thing would pass the bench.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "flower_vs_stamen"


def harness_module(name: str) -> ModuleType:
    """``bench/flower_vs_stamen/<name>.py``, under a name of its own (``bench/simulation``
    has a ``workload`` module too)."""
    path = HARNESS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"flower_vs_stamen_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def in_harness(script: str) -> Any:
    """What ``script`` prints as JSON, run by a fresh interpreter with the harness's
    directory first on its path (its modules import each other by their plain names)."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(HARNESS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


floors = harness_module("floors")
workload = harness_module("workload")

MODEL_BYTES = 40_000  # two layers: 9,744 and 256 float32 values
EXPECTED = 4.5


def saved_model(path: Path, offset: float, at: int = 0) -> Path:
    """An ``np.savez`` of the bench model, every value ``EXPECTED`` but value ``at`` of
    the big layer, which is off by ``offset``."""
    layers = [np.full(n, EXPECTED, dtype=np.float32) for n in workload.model_shapes(MODEL_BYTES)]
    layers[0][at] += offset
    np.savez(path, *layers)
    return path


def test_a_saved_model_of_the_expected_values_passes(tmp_path: Path) -> None:
    check = workload.check_saved(saved_model(tmp_path / "m.npz", 0.0), MODEL_BYTES, EXPECTED)
    assert check["ok"] and check["max_abs_error"] == 0.0
    assert check["shapes"] == [[9_744], [256]]


@pytest.mark.parametrize("at", [0, 9_743])
def test_a_saved_model_off_by_one_value_fails(tmp_path: Path, at: int) -> None:
    """One wrong value, first or last (the checks read in chunks), fails the check."""
    path = saved_model(tmp_path / "m.npz", 1.0, at)
    check = workload.check_saved(path, MODEL_BYTES, EXPECTED)
    assert not check["ok"] and check["max_abs_error"] == 1.0


def test_a_saved_model_of_another_layout_fails(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, np.full(10_000, EXPECTED, dtype=np.float32))
    assert not workload.check_saved(path, MODEL_BYTES, EXPECTED)["ok"]


def test_the_median_form_expects_the_mean_form_value() -> None:
    """The median of ``p + k`` over ``k = 0 .. N-1`` is the mean, for odd and even ``N``."""
    for clients in (3, 4, 10):
        median = float(np.median(np.arange(clients, dtype=np.float32)))
        assert median == workload.expected_value(clients, 1)


def test_a_round_floor_is_two_loopback_crossings_and_one_memcpy_pass() -> None:
    speeds = {"loopback_bytes_per_s": 2e9, "memcpy_bytes_per_s": 8e9}
    floor = floors.round_floor(10, 100_000_000, speeds)
    assert floor["loopback_bytes"] == 2_000_000_000 and floor["memcpy_bytes"] == 1_000_000_000
    assert floor["seconds"] == pytest.approx(1.0 + 0.125)


def test_floors_are_measured_as_bytes_per_second() -> None:
    measured = floors.measure(quick=True)
    loop_bytes, copy_bytes, tries = floors.SIZES["quick"]
    assert len(measured["loopback_seconds"]) == len(measured["memcpy_seconds"]) == tries
    assert measured["loopback_bytes_per_s"] == loop_bytes / min(measured["loopback_seconds"])
    assert measured["memcpy_bytes_per_s"] == copy_bytes / min(measured["memcpy_seconds"])


def test_a_failed_run_names_the_signal_that_killed_it_or_its_last_line() -> None:
    """A process killed by the kernel leaves a log that ends mid-round: the report must
    say it was killed (the first line of the error, kept however long the log), and a
    crash its exception; colour codes of a log never reach the table."""
    script = """
import json, sys
sys.path.insert(0, sys.argv[1])
import report, run
log = "\\n".join(["\\x1b[92mINFO \\x1b[0m: aggregate_fit: received 50 results"] * 200)
killed = run.clipped("server failed (exit -9): " + log)
print(json.dumps([
    len(killed) <= 2100,
    report.reason(killed),
    report.reason(run.clipped("clients0 exit 1: Traceback\\n  File x\\nValueError: bad")),
    report.reason("timed out; server: \\x1b[93mWARNING\\x1b[0m: slow"),
]))
"""
    assert in_harness(script) == [
        True,
        "server failed (exit -9), killed by signal 9",
        "ValueError: bad",
        "timed out; server: WARNING: slow",
    ]


def test_targets_say_when_their_bound_is_below_what_grpcio_alone_takes() -> None:
    """A round-time target is shown beside grpcio alone's round for the same exchange (as
    a multiple of Flower's round), and said to be below it when it is; a grpc-rere
    target beside grpcio's own pull + push over stream ratio. The table relates both
    frameworks' rounds to grpcio's."""
    script = """
import json, sys
sys.path.insert(0, sys.argv[1])
import report

def entry(stamen, flower):
    summary = {"stamen": {"round_seconds": stamen, "runs_ok": 1},
               "flower": {"round_seconds": flower, "runs_ok": 1}}
    if flower:
        summary["ratio"] = {"round_seconds": stamen / flower}
    return {"summary": summary, "title": "t"}

results = {
    "workloads": {"A": entry(0.056, 0.169), "C": entry(0.105, 0.253),
                  "A-rere": entry(0.070, None), "C-rere": entry(0.190, None)},
    "grpc_floors": {
        "A": {"ok": True, "bidi": {"median_round_seconds": 0.048},
              "rere": {"median_round_seconds": 0.0768}},
        "C": {"ok": True, "bidi": {"median_round_seconds": 0.054},
              "rere": {"median_round_seconds": 0.1134}},
    },
}
found = {t["target"]: t["measured"] for t in report.targets_19(results)}
rows = [r for r in report.grpc_floor_table(results) if r.startswith("| A")]
print(json.dumps([
    found["A round time <= 0.25 x Flower"],
    found["C round time <= 0.25 x Flower"],
    found["A-rere round time <= 1.3 x A (grpc-bidi)"],
    found["C-rere round time <= 1.3 x C (grpc-bidi)"],
    rows,
]))
"""
    a, c, a_rere, c_rere, rows = in_harness(script)
    # 0.048 / 0.169 = 0.284: grpcio alone, doing nothing else, is over 0.25x of Flower's round.
    assert a == "0.331 x; grpcio alone 0.284 x: the bound is below grpcio's own round"
    assert c == "0.415 x; grpcio alone 0.213 x"  # 0.054 / 0.253: below the bound
    assert a_rere == (
        "1.25 x (0.070 s / 0.056 s); grpcio alone 1.60 x: the bound is below grpcio's own ratio"
    )
    assert c_rere.endswith("; grpcio alone 2.10 x: the bound is below grpcio's own ratio")
    # One row per grpc-bidi workload; its grpc-rere point in the last column (0.070 / 0.0768).
    assert rows == [
        "| A | 0.048 s | 0.056 s | 1.17 x | 0.169 s | 3.52 x | 0.077 s | 1.60 x | 0.91 x |"
    ]
