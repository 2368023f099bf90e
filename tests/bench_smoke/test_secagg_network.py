"""Smoke test of the SecAgg+ network benchmark (``bench/secagg/network.py --quick``).

A real Stamen server process with FedAvg, then with ``SecAggPlus(FedAvg)``, and two node
processes of ``start_client`` threads, on each transport, at tiny sizes (6 nodes x 10 k
parameters): every run completes, the aggregate is within SecAgg+'s stated bound of plain
FedAvg's, and the row holds the round's time, CPU, bytes on the wire and peak RSS. It
tests the harness, not performance: nothing here is timed against a bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "bench" / "secagg" / "network.py"
NODES, PARAMS = 6, 10_000


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_quick_round_with_and_without_secagg_over_the_network(
    tmp_path: Path, transport: str
) -> None:
    """``network.py --quick``: a plain and a SecAgg+ round, both checked and measured; the
    bytes are the model both ways per node plus framing, and SecAgg+'s key stages add to
    them."""
    out = tmp_path / "secagg-network.json"
    argv = [sys.executable, str(DRIVER), "--quick", "--repeat", "1", "--timeout", "60"]
    done = subprocess.run(
        [*argv, "--transport", transport, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    plain, secure = json.loads(out.read_text(encoding="utf-8"))
    assert (plain["secagg"], secure["secagg"]) == (False, True)
    assert (secure["num_shares"], secure["threshold"]) == (5, 3)
    payload = 2 * NODES * 4 * PARAMS  # the model down and the update up, per node
    for row in (plain, secure):
        assert (row["nodes"], row["params"], row["transport"]) == (NODES, PARAMS, transport)
        assert row["max_abs_error"] <= row["tolerance"] <= row["bound"] + NODES * 2.4e-7, row
        assert payload < row["wire_bytes"] < 1.2 * payload, row
        assert row["bytes_per_node"] == row["wire_bytes"] // NODES
        assert row["connections_lost"] == 0
        assert row["round_s"] > 0 and row["server_cpu_s"] > 0
        assert row["server_peak_rss_mb"] > 0 and row["node_process_peak_rss_mb"] > 0
    assert plain["bound"] == 0.0 and 0 < secure["bound"] < 1e-4
    assert secure["wire_bytes"] > plain["wire_bytes"]
    assert "round s" in done.stdout
