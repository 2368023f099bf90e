"""The scale path of grpc-rere and rest: 2,000 asyncio Fleet nodes (``bench/flower_vs_stamen``'s
``swarm.py --transport ...``) registering at once and training one round on a Stamen
server (``server_stamen.py``), in real processes on 127.0.0.1.

What it proves: every node registers and answers, the round aggregates all 2,000 results
into the model the check expects, every node's session ends, and on grpc-rere no call is
cancelled by the server (gRPC's own limit of pending calls cancels most of a burst of
2,000; ``stamen.server.fleet.service.PENDING_CALLS`` lifts it). Nothing is timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "bench" / "flower_vs_stamen"
sys.path.insert(0, str(HARNESS))

from procs import Proc, environment, split, wait_for_run  # noqa: E402

NODES = 2000
PROCESSES = 2
RUN_TIMEOUT = 150.0

pytestmark = pytest.mark.slow


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_2000_fleet_nodes_complete_a_round(tmp_path: Path, transport: str) -> None:
    """2,000 nodes on one transport: all results aggregated, the final model checked, every
    node's session ended; no grpc-rere call cancelled by the server."""
    out = tmp_path / "server.json"
    argv = [sys.executable, str(HARNESS / "server_stamen.py"), "--clients", str(NODES)]
    argv += ["--model-bytes", "4000", "--rounds", "1", "--out", str(out)]
    if transport == "rest":
        argv.append("--rest")
    procs: list[Proc] = []
    try:
        server = Proc("server", argv, tmp_path, environment("stamen"))
        procs.append(server)
        rest = transport == "rest"
        port = server.wait_for_line("REST_PORT" if rest else "PORT", 60).split()[1]
        address = f"http://127.0.0.1:{port}" if rest else f"127.0.0.1:{port}"
        clients = []
        for index, (first, count) in enumerate(split(NODES, PROCESSES)):
            swarm = [sys.executable, str(HARNESS / "swarm.py"), "--transport", transport]
            swarm += ["--address", address, "--first", str(first), "--count", str(count)]
            swarm += ["--timeout", str(RUN_TIMEOUT)]
            clients.append(Proc(f"swarm{index}", swarm, tmp_path, environment("stamen")))
        procs.extend(clients)
        wait_for_run(server, clients, time.monotonic() + RUN_TIMEOUT)
        for client in clients:
            assert client.proc.wait(60) == 0, client.tail()
        report = json.loads(out.read_text(encoding="utf-8"))
        lines = [client.value("CLIENTS") for client in clients]
        retries = sum(int(client.value("RETRIES") or 0) for client in clients)
    finally:
        for proc in procs:
            proc.stop()
    assert report["check"]["ok"], report["check"]
    assert [(r["results"], r["failures"]) for r in report["rounds"]] == [(NODES, 0)]
    assert lines == [f"ok={count} failed=0 stuck=0" for _, count in split(NODES, PROCESSES)]
    if transport == "grpc-rere":
        assert retries == 0, f"{retries} calls were refused or cancelled and sent again"
