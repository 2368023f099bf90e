"""Subprocesses of a bench run: started with a log, read line by line, always stopped."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
KILL_TIMEOUT = 10.0


class Proc:
    """A subprocess whose stdout lines are read by a thread; stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self._log_path.open("wb")
        self._queue: queue.Queue[str | None] = queue.Queue()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                text=True,
                cwd=HERE,
            )
        except OSError:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with ``prefix``.

        Raises:
            RuntimeError: the process ended, or printed no such line in ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no {prefix!r} within {timeout:g} s") from None
            if line is None:
                self.proc.wait(KILL_TIMEOUT)
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def value(self, prefix: str) -> str | None:
        """After exit: the rest of the first stdout line starting with ``prefix``."""
        self._reader.join(KILL_TIMEOUT)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        found = [line for line in self.lines if line.startswith(prefix)]
        return found[0][len(prefix) :].strip() if found else None

    def tail(self, chars: int = 1500) -> str:
        """The end of the process's stderr."""
        self._log.flush()
        text = self._log_path.read_text(encoding="utf-8", errors="replace")
        return text[-chars:].strip()

    def stop(self) -> None:
        """Kill the process if it still runs; release its pipe and log."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(KILL_TIMEOUT)
        self._reader.join(KILL_TIMEOUT)  # at the pipe's end once the process is gone
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        self._log.close()


def environment(framework: str) -> dict[str, str]:
    """Stamen processes inherit ours; Flower's get no PYTHONPATH and no telemetry."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if framework == "flower":
        env.pop("PYTHONPATH", None)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` of ``parts`` near-equal slices of ``range(total)``."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    slices, first = [], 0
    for index in range(parts):
        count = base + (1 if index < extra else 0)
        slices.append((first, count))
        first += count
    return slices


def wait_for_run(server: Proc, clients: list[Proc], deadline: float) -> None:
    """Until the server exits; fail early when a client process fails or time runs out."""
    while server.proc.poll() is None:
        for client in clients:
            if client.proc.poll() not in (None, 0):
                raise RuntimeError(
                    f"{client.name} failed (exit {client.proc.returncode}): {client.tail()}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out; server: {server.tail(600)}")
        time.sleep(0.1)
    if server.proc.returncode != 0:
        raise RuntimeError(f"server failed (exit {server.proc.returncode}): {server.tail()}")
