"""Progress on stderr when the program set up no logging, and only for the run."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import logging
from stamen.server.events import RoundStarted, RunStarted
from stamen.server.progress import ProgressLog, shown_progress

stamen = logging.getLogger("stamen")
with shown_progress():
    view = ProgressLog()
    view(RunStarted(3, "FedAvg"))
    view(RoundStarted(1, "fit", 2))
    logging.getLogger("stamen.server").debug("not shown")
print(len(stamen.handlers), stamen.level, flush=True)
logging.getLogger("stamen.server").info("after the run: not shown")
"""

_CONFIGURED = """
import logging, sys
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
from stamen.server.progress import ProgressLog, shown_progress
from stamen.server.events import RunStarted
with shown_progress():
    ProgressLog()(RunStarted(3, "FedAvg"))
print("done")
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )


def test_progress_shows_on_stderr_when_no_logging_is_configured() -> None:
    """A program with no logging set up sees INFO progress lines on stderr during the
    run, and nothing is left installed afterwards."""
    done = _run(_PROBE)
    assert done.stderr.splitlines() == [
        "INFO stamen.server: run started: 3 round(s) of FedAvg",
        "INFO stamen.server: round 1/3: fit sent to 2 node(s)",
    ]
    assert done.stdout.split() == ["0", "0"]


def test_a_programs_own_logging_configuration_is_left_alone() -> None:
    """With logging configured (WARNING), the INFO lines follow that configuration."""
    done = _run(_CONFIGURED)
    assert done.stdout.splitlines() == ["done"]
    assert done.stderr == ""


_SIMULATION = """
import numpy as np
import stamen as fl

class C(fl.client.NumPyClient):
    def get_parameters(self, config):
        return [np.zeros(2)]
    def fit(self, parameters, config):
        return parameters, 1, {}
    def evaluate(self, parameters, config):
        return 0.5, 1, {}

fl.simulation.start_simulation(
    client_fn=lambda cid: C().to_client(), num_clients=2,
    config=fl.server.ServerConfig(num_rounds=1),
)
import logging
print(len(logging.getLogger("stamen").handlers), flush=True)
"""


def test_start_simulation_shows_progress_when_no_logging_is_configured() -> None:
    """start_simulation, like start_server and start_client, shows its run at INFO on
    stderr when the program set up no logging, and leaves no handler behind."""
    done = _run(_SIMULATION)
    lines = done.stderr.splitlines()
    assert "INFO stamen.server: run started: 1 round(s) of FedAvg" in lines
    assert any(line.startswith("INFO stamen.server: run completed: 1 round(s)") for line in lines)
    assert done.stdout.split() == ["0"]


_LIVE = """
import logging
from stamen.server.events import RoundEnded, RoundStarted, RunEnded, RunEvents, RunStarted
from stamen.server.progress import ProgressLog, shown_run

events = RunEvents()
events.subscribe(ProgressLog())
with shown_run(events):
    events.publish(RunStarted(2, "FedAvg"))
    events.publish(RoundStarted(1, "fit", 2))
    events.publish(RoundEnded(1, "fit", 2, 0, 0.1))
    logging.getLogger("stamen.server").warning("a warning above the panel")
    events.publish(RunEnded(True, 2, 0.2))
print("HANDLERS", len(logging.getLogger("stamen").handlers), flush=True)
"""


def test_on_a_terminal_a_run_is_drawn_as_a_live_panel() -> None:
    """start_server's progress (shown_run) on a terminal, with rich and no logging set up
    by the program: the rich panel instead of plain INFO lines, warnings above it, and
    nothing left installed afterwards."""
    import os
    import pty
    import re

    pytest.importorskip("rich", reason="rich (stamen[rich]) is not installed")
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", _LIVE],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm"},
    )
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed (EIO): the process has exited
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        assert process.wait(60) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    assert "FedAvg" in screen and "a warning above the panel" in screen, screen
    assert "run started: 2 round(s) of FedAvg" not in screen  # drawn, not logged
    assert "HANDLERS 0" in screen
