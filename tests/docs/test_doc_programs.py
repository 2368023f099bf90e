"""Every program in the documentation runs (tests/docs/programs.py says how they are marked).

Each runs in a fresh folder with this interpreter (its ``bin`` first on ``PATH``, so the
``stamen`` command is this Stamen), servers on a free port of 127.0.0.1, every process in
its own process group and killed if it overruns.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .programs import PORT_TEXT, ROOT, Block, all_blocks, blocks_of

BLOCKS = all_blocks()
PROGRAMS = [block for block in BLOCKS if block.kind == "run"]


def _timeout(block: Block) -> float:
    return float(block.options.get("timeout", 120))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_the_docs_have_programs() -> None:
    """The markers parse, and the pages that teach by program have some."""
    assert len(PROGRAMS) >= 8, [b.id for b in PROGRAMS]
    pages = {block.page.name for block in PROGRAMS}
    for page in ("README.md", "getting-started.md", "simulation.md", "resume.md"):
        assert page in pages, f"no program is marked in {page}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "block",
    [
        pytest.param(block, id=block.id, marks=pytest.mark.timeout(_timeout(block) + 60))
        for block in PROGRAMS
    ],
)
def test_program_runs(block: Block, tmp_path: Path) -> None:
    if "requires" in block.options and importlib.util.find_spec(block.options["requires"]) is None:
        pytest.skip(f"{block.options['requires']} not installed")
    port = _free_port()
    for other in blocks_of(block.page):
        if other.kind == "file":
            (tmp_path / other.name).write_text(other.code.replace(PORT_TEXT, f"127.0.0.1:{port}"))
    program = tmp_path / block.name
    program.write_text(block.code.replace(PORT_TEXT, f"127.0.0.1:{port}"))
    interpreter = ["bash"] if block.language in ("sh", "bash") else [sys.executable]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    timeout = _timeout(block)
    deadline = time.monotonic() + timeout
    processes: list[subprocess.Popen[str]] = []
    logs = [tmp_path / f"output-{index}.txt" for index in range(len(block.procs))]
    try:
        for index, args in enumerate(block.procs):
            if index == 1:
                _wait_for_port(port, deadline)
            with logs[index].open("w") as log:
                processes.append(
                    subprocess.Popen(
                        [*interpreter, str(program), *args],
                        cwd=ROOT if block.options.get("cwd") == "repo" else tmp_path,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        text=True,
                        start_new_session=True,
                    )
                )
        for process, log in zip(processes, logs, strict=True):
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{block.id}: did not finish in {timeout} s:\n{_tail(log)}")
    finally:
        for process in processes:
            _kill(process)
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, f"{block.id}: {process.args}:\n{_tail(log)}"
    if "expect" in block.options:
        output = logs[0].read_text()
        assert re.search(block.options["expect"], output), f"{block.id}:\n{_tail(logs[0])}"
