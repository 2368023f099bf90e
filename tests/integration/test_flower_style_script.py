"""Flower user code runs unchanged after ``import stamen as fl``."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).with_name("flower_style_app.py")


def _free_port() -> int:
    # A Flower-style script takes a fixed address, so the test must name a port up front.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_flower_quickstart_runs_unchanged_with_stamen() -> None:
    """A Flower quickstart (NumPyClient, start_server with FedAvg and ServerConfig,
    start_client) trains 3 rounds in 3 processes; clients started before the server is up
    wait for it, and every process exits 0."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(APP), "client", address, str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (1, 3)
    ]
    server = subprocess.Popen(
        [sys.executable, str(APP), "server", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(server)
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    # Each round adds lr * (1*1 + 3*3) / 4 = 1.25; the loss is |params[1]|.sum() = 2 * that.
    server_out = outputs[-1][0]
    assert "LOSSES [(1, 2.5), (2, 5.0), (3, 7.5)]" in server_out
    assert "ACCURACY" in server_out
    assert all("CLIENT DONE" in out for out, _ in outputs[:2])
