"""Every example in examples/ runs end to end, as its README says, with a small configuration.

Each example is run as a person runs it (``python run.py`` or ``./run.sh`` in its folder),
with fewer rounds; its processes (server and nodes on 127.0.0.1, free ports) are ended if
it overruns. The PyTorch and XGBoost examples run when their package is importable and are
skipped otherwise, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 240.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT + 60)]


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} not installed"
    )


def run_example(folder: str, *command: str, env: dict[str, str] | None = None) -> str:
    """Run ``command`` in ``examples/folder``; return the last line it printed."""
    process = subprocess.Popen(
        command,
        cwd=EXAMPLES / folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: the nodes and server end with it
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{folder} did not finish in {TIMEOUT} s:\n{output[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-4000:]
    lines = output.strip().splitlines()
    assert lines, f"{folder} printed nothing"
    return lines[-1]


def test_sklearn_logreg() -> None:
    line = run_example("sklearn_logreg", sys.executable, "run.py", "--rounds", "3", "--nodes", "3")
    match = re.fullmatch(r"Final test accuracy: (\d\.\d{4}) after 3 rounds on 3 nodes", line)
    assert match, line
    assert float(match.group(1)) > 0.8


@_needs("torch")
def test_pytorch_cnn() -> None:
    line = run_example("pytorch_cnn", sys.executable, "run.py", "--rounds", "3", "--nodes", "3")
    match = re.fullmatch(r"Final test accuracy: (\d\.\d{4}) after 3 rounds on 3 nodes", line)
    assert match, line
    assert float(match.group(1)) > 0.5  # 4 shapes: chance is 0.25


@_needs("xgboost")
def test_xgboost_bagging() -> None:
    line = run_example("xgboost_bagging", sys.executable, "run.py", "--rounds", "2")
    match = re.fullmatch(r"Final test AUC: (\d\.\d{4}) after 2 rounds on 3 nodes", line)
    assert match, line
    assert float(match.group(1)) > 0.8


def test_stateful_client() -> None:
    line = run_example("stateful_client", sys.executable, "run.py", "--rounds", "3")
    match = re.fullmatch(
        r"Final loss: (\d+\.\d{4}) after 3 rounds; each of the 3 nodes counted 3-3 rounds "
        r"in context.state",
        line,
    )
    assert match, line


def test_custom_strategy(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    command = [sys.executable, "run.py", "--rounds", "3", "--model-dir", str(model_dir)]
    line = run_example("custom_strategy", *command)
    match = re.fullmatch(
        rf"Saved 3 models in {re.escape(str(model_dir))}; the last one, round-3.npz: "
        r"mean MSE (\d+\.\d{4}) on the nodes' data",
        line,
    )
    assert match, line
    assert sorted(p.name for p in model_dir.iterdir()) == [f"round-{r}.npz" for r in (1, 2, 3)]


def test_deployment() -> None:
    line = run_example(
        "deployment", "bash", "run.sh", env={"PYTHON": sys.executable, "ROUNDS": "2"}
    )
    match = re.fullmatch(
        r"Final loss: (\d+\.\d{4}) after 2 rounds over TLS with 2 authenticated nodes", line
    )
    assert match, line
    assert float(match.group(1)) < 1.0
