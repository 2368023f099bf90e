"""start_server with server_address and rest_address serves three node processes at once."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

APP = Path(__file__).with_name("three_transports_app.py")


def test_one_server_three_transports_three_processes_all_exit_zero() -> None:
    """A server process (start_server with server_address and rest_address, both on port
    0) and three node processes, one per transport, train 3 rounds; every process exits 0
    and the distributed losses are those of the exact weighted mean."""
    server = subprocess.Popen(
        [sys.executable, str(APP), "server"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert server.stderr is not None
    stderr = server.stderr
    reader = threading.Thread(target=lambda: [lines.put(x) for x in stderr], daemon=True)
    reader.start()
    nodes: list[subprocess.Popen[str]] = []
    try:
        grpc_port = rest_port = None
        while grpc_port is None or rest_port is None:
            line = lines.get(timeout=30)
            if match := re.search(r"serving grpc-bidi and grpc-rere on .* \(port (\d+)\)", line):
                grpc_port = int(match.group(1))
            if match := re.search(r"serving rest on .* \(port (\d+)\)", line):
                rest_port = int(match.group(1))
        addresses = {
            "grpc-bidi": f"127.0.0.1:{grpc_port}",
            "grpc-rere": f"127.0.0.1:{grpc_port}",
            "rest": f"http://127.0.0.1:{rest_port}",
        }
        for k, (transport, address) in enumerate(addresses.items(), start=1):
            nodes.append(
                subprocess.Popen(
                    [sys.executable, str(APP), "node", transport, address, str(k)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [node.communicate(timeout=60) for node in nodes]
        server_out, _ = server.communicate(timeout=60)
    finally:
        for proc in (server, *nodes):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        reader.join(10)
    assert server.returncode == 0
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err
        assert "NODE DONE" in out
    # Each round adds (1*1 + 2*2 + 3*3) / 6 = 7/3; evaluate's loss is the sum of 3 weights.
    losses = json.loads(server_out.strip().splitlines()[-1])["losses"]
    assert [r for r, _ in losses] == [1, 2, 3]
    for (server_round, loss), expected in zip(losses, (7.0, 14.0, 21.0), strict=True):
        assert abs(loss - expected) < 1e-4, (server_round, loss)
