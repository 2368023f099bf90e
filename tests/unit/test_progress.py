"""Progress on stderr when the program set up no logging, and only for the run."""

from __future__ import annotations

import subprocess
import sys

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
