"""The fleet's budget of request bytes bounds gRPC too, measured from outside the server.

A server process (``limits_server_proc.py``, 8 MiB messages, a 16 MiB budget) gets 32
concurrent 8 MiB Flower PushTaskRes calls from a peer that is not authenticated (node
authentication off: every request counts). Calls that would take the budget over are
refused UNAVAILABLE before their message is read (gRPC holds at most a flow-control
window of each), with a WARNING naming the budget; the server's peak RSS rises by less
than four times the budget plus 48 MiB (each admitted message lives up to three times at
once: in gRPC's buffer, as bytes, decoded; measured 65-100 MiB), where the same calls
without a budget raise it by ~350 MiB.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stamen.wire import FlowerCall

HERE = Path(__file__).parent
MAX = 8 << 20
BUDGET = 16 << 20
CALLS = 32


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "limits_server_proc.py"), str(MAX), str(BUDGET)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the server prints it or exits
        assert line.startswith("PORTS"), (line, log.read_text()[-2000:])
        yield proc, int(line.split()[1]), log
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_concurrent_large_unauthenticated_grpc_calls_stay_within_the_budget(
    server: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, port, log = server
    size = MAX - 16
    message = b"\x7a" + _varint(size) + b"\x01" * size  # an unknown field of ~8 MiB
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]
    )
    try:
        push = channel.unary_unary(FlowerCall.PUSH_TASK_RES.grpc_method)
        with pytest.raises(grpc.RpcError):
            push(b"", timeout=20)  # warm up: the server has served a call
        before = _status(proc.pid, "VmRSS")
        calls = [push.future(message, timeout=60) for _ in range(CALLS)]
        codes: Counter[str] = Counter()
        for call in calls:
            try:
                call.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
        growth = _status(proc.pid, "VmHWM") - before
    finally:
        channel.close()
    # Every call was read and answered (NOT_FOUND: no such node) or refused unread.
    assert set(codes) <= {"NOT_FOUND", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] > 0 and codes["NOT_FOUND"] > 0, codes
    assert growth < 4 * BUDGET + (48 << 20), f"peak RSS grew by {growth >> 20} MiB, {codes}"
    assert "max_unverified_bytes" in log.read_text()
