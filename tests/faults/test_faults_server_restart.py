"""A server SIGKILLed mid-run and restarted resumes from its checkpoint: same result."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from stamen.testing import NodeThread, node_threads
from stamen.testing.conformance import TRANSPORTS, AddClient

SCRIPT = Path(__file__).with_name("faults_server_proc.py")
ROUNDS = 5


class ServerProcess:
    """The server script in a subprocess, with its stdout read line by line."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        self._reader = threading.Thread(
            target=lambda: [self.lines.put(line) for line in stdout], daemon=True
        )
        self._reader.start()

    def ports(self, timeout: float = 30) -> tuple[int, int]:
        while True:
            line = self.lines.get(timeout=timeout)
            if line.startswith("PORTS "):
                grpc_port, rest_port = line.split()[1:]
                return int(grpc_port), int(rest_port)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def close(self) -> None:
        """Kill the process if it still runs, and release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _run(tmp: Path, transport: str, kill: str | None) -> dict[str, Any]:
    """Run 5 rounds with 2 nodes; with ``kill``, the first server dies in round 3 and a
    second one is started on the same ports and checkpoint folder."""
    checkpoints, result = tmp / "checkpoints", tmp / "result.json"
    first = ServerProcess(
        [str(checkpoints), str(result), str(ROUNDS), "0", "0", *([kill] if kill else [])]
    )
    servers = [first]
    try:
        grpc_port, rest_port = first.ports()
        address = (
            f"http://127.0.0.1:{rest_port}" if transport == "rest" else f"127.0.0.1:{grpc_port}"
        )
        with node_threads(join_timeout=90) as nodes:
            for k in (1, 3):
                nodes.append(
                    NodeThread(
                        {
                            "server_address": address,
                            "transport": transport,
                            "client": AddClient(k).to_client(),
                        }
                    ).start()
                )
            if kill:
                assert first.wait(60) == -signal.SIGKILL
                assert not result.exists()
                second = ServerProcess(
                    [str(checkpoints), str(result), str(ROUNDS), str(grpc_port), str(rest_port)]
                )
                servers.append(second)
                assert second.ports() == (grpc_port, rest_port)
            assert servers[-1].wait(90) == 0
            assert [node.join(60) for node in nodes] == [None, None]
    finally:
        for server in servers:
            server.close()
    data: dict[str, Any] = json.loads(result.read_text())
    return data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("reference"), "grpc-bidi", None)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigkill_mid_fit_then_restart_gives_the_uninterrupted_result(
    transport: str, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    """SIGKILL while the nodes fit round 3, restart on the same port: the run resumes after
    round 2's checkpoint, every node reconnects by itself, and the final parameters and
    History equal those of an uninterrupted run."""
    resumed = _run(tmp_path, transport, "mid-fit")
    assert resumed == uninterrupted
    assert uninterrupted["parameters"][1] == [12.5, 12.5, 12.5]  # 5 rounds x (1 + 9) / 4
    assert [r for r, _ in uninterrupted["history"]["losses_distributed"]] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("kill", ["mid-aggregation", "mid-write"])
def test_sigkill_mid_aggregation_or_mid_checkpoint_write(
    kill: str, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    """SIGKILL inside aggregation, or after part of round 3's checkpoint is on disk: the
    partial checkpoint is never used, and the resumed run equals the uninterrupted one."""
    assert _run(tmp_path, "grpc-bidi", kill) == uninterrupted
