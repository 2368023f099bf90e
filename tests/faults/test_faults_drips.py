"""Slow-drip connections at a 1,024-descriptor limit do not lock honest nodes out.

A server process (``tests/security/limits_server_proc.py``, one round of FedAvg with two
nodes) runs with RLIMIT_NOFILE soft = hard = 1024: REST takes 512 connections, gRPC 384,
the rest is the server's own (checkpoints, gRPC's and asyncio's internals). 1,100
connections from 127.0.0.2-9 (550 on each port) send the start of a request and then a
byte every 0.3 s, and open a new connection whenever theirs is closed: on REST the head
of a request whose headers never end, on gRPC the HTTP/2 preface, SETTINGS, and a HEADERS
frame whose header block never ends.

A grpc-rere node (``start_client`` in a process of its own) is connected before the
flood: its connection carries calls, and is kept while gRPC's cap holds the drippers
back. A REST node starts during the flood: REST closes the connection that has waited
longest for a whole request to take it. The round must end within 15 s of the REST
node's start; the server's log must show both connection limits biting and no
descriptor running out (without gRPC's cap the drippers take them all, and REST can
accept nothing). A node that connects to gRPC during such a flood gets in only when the
server has closed drippers and none of them took the room first: see docs/security.md.
"""

from __future__ import annotations

import contextlib
import queue
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_tools import GRPC_HEAD, Drippers, DripSlot, NodeProcess

from stamen.wire import Verb

SERVER = Path(__file__).resolve().parents[1] / "security" / "limits_server_proc.py"
DESCRIPTORS = 1024
DRIPPERS = 1100
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
ROUND_WITHIN = 15.0

REST_HEAD = f"POST {Verb.HEARTBEAT.rest_path} HTTP/1.1\r\nhost: x\r\nx-drip: ".encode()


class ServerProcess:
    """``limits_server_proc.py`` with its descriptor limit at :data:`DESCRIPTORS`."""

    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "server.log"
        self._stderr = self.log.open("w")
        command = [sys.executable, str(SERVER), str(1 << 20), "0", "0", "1", str(tmp_path)]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS)
            ),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="server-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the server within {timeout} s") from None
        assert line is not None, f"the server ended: {self.log.read_text()[-3000:]}"
        return line

    def wait_log(self, text: str, timeout: float) -> None:
        """Wait until the server's log says ``text`` (bounded)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {text!r} in the server's log in {timeout} s"
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.1)  # or the process ends

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def own_descriptors() -> Iterator[None]:
    """This process needs a descriptor per dripping connection, and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * DRIPPERS
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs an open-files hard limit of {want}, have {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2-9 need Linux")
def test_drippers_filling_both_ports_do_not_lock_honest_nodes_out(
    tmp_path: Path, own_descriptors: None
) -> None:
    server = ServerProcess(tmp_path)
    drippers: Drippers | None = None
    nodes: list[NodeProcess] = []
    try:
        ports = server.line(30).split()
        assert ports[0] == "PORTS", ports
        grpc_port, rest_port = int(ports[1]), int(ports[2])
        slots = [
            DripSlot(
                ("127.0.0.1", rest_port if i % 2 == 0 else grpc_port),
                SOURCES[i // 2 % len(SOURCES)],
                REST_HEAD if i % 2 == 0 else GRPC_HEAD,
            )
            for i in range(DRIPPERS)
        ]
        nodes.append(
            NodeProcess(f"127.0.0.1:{grpc_port}", "grpc-rere", 2, log=tmp_path / "rere.log")
        )
        server.wait_log("waiting for clients: 1/2 connected", 30)
        drippers = Drippers(slots)
        drippers.start()
        # Both limits bite before the REST node comes.
        server.wait_log("without a whole request, to make room", 20)
        server.wait_log("that carried no call, to make room", 20)

        started = time.monotonic()
        nodes.append(
            NodeProcess(f"http://127.0.0.1:{rest_port}", "rest", 1, log=tmp_path / "rest.log")
        )
        line = server.line(ROUND_WITHIN + 5)
        elapsed = time.monotonic() - started
        assert line == "ROUNDS 1 done", (line, server.log.read_text()[-3000:])
        assert elapsed < ROUND_WITHIN, f"the round took {elapsed:.1f} s"
        print(f"round over {elapsed:.1f} s after the REST node started")
        for node in nodes:
            assert node.wait_exit(20) == "EXIT ok", node.stderr_tail()
        assert drippers.reopened > 0  # the server closed drippers, which came back
    finally:
        for node in nodes:
            node.close()
        if drippers is not None:
            drippers.stop()
        server.close()
    log = server.log.read_text()
    assert "Too many open files" not in log and "out of system resource" not in log, log[-3000:]
