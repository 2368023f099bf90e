"""Helpers of the interop tests: Flower peers in subprocesses, Stamen nodes in threads.

Every wait here is bounded and every process or thread started is stopped by its owner's
``stop``/``close`` (called from the tests' ``finally`` blocks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

import stamen as fl
from stamen.common import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server import History, SimpleClientManager
from stamen.server.strategy import FedAvg
from stamen.testing import running_server

from .peers import scenario

REPO = Path(__file__).resolve().parents[2]
PEERS = Path(__file__).resolve().parent / "peers"
FLOWER_VERSION = "1.12.0"

# Bounds of every wait, in seconds. A run takes 0.3-3 s; these only stop a broken run, and
# add up to well under pytest's 120 s per-test timeout.
PORT_TIMEOUT = 30.0
RUN_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
KILL_TIMEOUT = 5.0
CLIENT_WAIT_TIMEOUT = 20.0
ROUND_TIMEOUT = 20.0


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), never negative."""
    return max(0.0, deadline - time.monotonic())


# --- the Flower venv ------------------------------------------------------------------------


@functools.cache
def _probe_flower(python: str) -> str | None:
    """None if ``python`` imports Flower 1.12.0, else why not."""
    if not Path(python).exists():
        return f"{python} does not exist"
    try:
        probe = subprocess.run(
            [python, "-c", "import flwr; print(flwr.__version__)"],
            capture_output=True,
            text=True,
            timeout=30,
            env=peer_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{python} -c 'import flwr' did not finish within 30 s"
    version = probe.stdout.strip()
    if probe.returncode != 0 or version != FLOWER_VERSION:
        return (
            f"{python} cannot import flwr=={FLOWER_VERSION} (exit {probe.returncode}, "
            f"version {version!r}): {probe.stderr.strip()[-500:]}"
        )
    return None


def flower_python() -> Path:
    """The Flower venv's python: ``$STAMEN_FLWR_PYTHON``, else ``<repo>/.venv-flwr/bin/python``.

    Fails the calling test (never skips) if it is missing or has no Flower 1.12.0.
    """
    configured = os.environ.get("STAMEN_FLWR_PYTHON")
    python = Path(configured) if configured else REPO / ".venv-flwr" / "bin" / "python"
    problem = _probe_flower(str(python))
    if problem is not None:
        pytest.fail(
            f"interop tests need real Flower {FLOWER_VERSION} in its own virtualenv: {problem}. "
            "Run `make interop-venv` (builds .venv-flwr) or set STAMEN_FLWR_PYTHON to the "
            "python of a virtualenv with flwr==1.12.0.",
            pytrace=False,
        )
    return python


def peer_env() -> dict[str, str]:
    """Environment of a Flower peer: no telemetry, no bytecode in the repo, no Stamen path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- a subprocess whose stdout is read line by line --------------------------------------


class Peer:
    """A peer script in a subprocess; stdout lines go through a queue, stderr to a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.stdout_lines: list[str] = []
        self._stderr_path = log_dir / f"{name}.stderr.log"
        self._stderr: IO[bytes] = self._stderr_path.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=peer_env(),
            text=True,
            encoding="utf-8",
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def describe(self) -> str:
        """Command, exit status, stdout so far and the tail of stderr, for failure messages."""
        self._stderr.flush()
        stderr = self._stderr_path.read_text(encoding="utf-8", errors="replace")
        return (
            f"--- {self.name}: {' '.join(self.argv)}\n"
            f"exit status: {self.proc.poll()}\n"
            f"stdout: {self.stdout_lines}\n"
            f"stderr (tail):\n{stderr[-4000:]}"
        )

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """Return the first stdout line starting with ``prefix``, waiting at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = remaining(deadline)
                if left <= 0:
                    raise queue.Empty
                line = self._lines.get(timeout=left)
            except queue.Empty:
                raise AssertionError(
                    f"{self.name} printed no {prefix!r} line within {timeout:g} s\n"
                    + self.describe()
                ) from None
            if line is None:
                self.proc.wait(KILL_TIMEOUT)
                raise AssertionError(
                    f"{self.name} ended before printing {prefix!r}\n" + self.describe()
                )
            self.stdout_lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float) -> int:
        """Wait for the process to exit by itself; return its exit status."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g} s\n" + self.describe()
            ) from None
        self._drain()
        return status

    def _drain(self) -> None:
        self._reader.join(KILL_TIMEOUT)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.stdout_lines.append(line)

    def stop(self) -> None:
        """Kill the process if it still runs; release its pipe, file and reader thread."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(KILL_TIMEOUT)
        self._drain()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


# --- what a run produced ---------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything a run produced that the tests compare, in one form for Flower and Stamen."""

    rounds: list[tuple[int, list[np.ndarray]]]
    fit_failures: list[int]
    evaluate_failures: list[int]
    losses_distributed: list[tuple[int, float]]
    metrics_distributed_fit: dict[str, list[tuple[int, Any]]]
    metrics_distributed: dict[str, list[tuple[int, Any]]]
    events: dict[int, list[str]] = field(default_factory=dict)
    disconnects: list[dict[str, str]] = field(default_factory=list)

    @property
    def final(self) -> list[np.ndarray]:
        """The global model after the last round."""
        return self.rounds[-1][1]

    @classmethod
    def from_flower_json(cls, path: Path, events: dict[int, list[str]]) -> Outcome:
        """Read what ``peers/flower_server.py`` wrote."""
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            rounds=[
                (r["round"], [scenario.decode_ndarray(a) for a in r["params"]])
                for r in data["rounds"]
            ],
            fit_failures=data["fit_failures"],
            evaluate_failures=data["evaluate_failures"],
            losses_distributed=[(r, loss) for r, loss in data["losses_distributed"]],
            metrics_distributed_fit=scenario.decode_metrics(data["metrics_distributed_fit"]),
            metrics_distributed=scenario.decode_metrics(data["metrics_distributed"]),
            events=events,
            disconnects=data["disconnects"],
        )

    @classmethod
    def from_stamen(
        cls, strategy: RecordingFedAvg, history: History, events: dict[int, list[str]]
    ) -> Outcome:
        """Collect a Stamen server's run."""
        return cls(
            rounds=list(strategy.rounds),
            fit_failures=list(strategy.fit_failures),
            evaluate_failures=list(strategy.evaluate_failures),
            losses_distributed=list(history.losses_distributed),
            metrics_distributed_fit=dict(history.metrics_distributed_fit),
            metrics_distributed=dict(history.metrics_distributed),
            events=events,
        )


def _typed(metrics: dict[str, list[tuple[int, Any]]]) -> dict[str, list[tuple[int, Any]]]:
    return {k: [(r, (type(v).__name__, v)) for r, v in vs] for k, vs in metrics.items()}


def assert_same_run(actual: Outcome, expected: Outcome) -> None:
    """Bit-identical models every round, equal losses, equal metrics of equal types."""
    assert [r for r, _ in actual.rounds] == [r for r, _ in expected.rounds]
    for (server_round, got), (_, want) in zip(actual.rounds, expected.rounds, strict=True):
        assert len(got) == len(want), f"round {server_round}: number of layers"
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert (a.dtype, a.shape) == (b.dtype, b.shape), f"round {server_round} layer {index}"
            np.testing.assert_array_equal(a, b, err_msg=f"round {server_round} layer {index}")
    assert actual.fit_failures == expected.fit_failures
    assert actual.evaluate_failures == expected.evaluate_failures
    assert actual.losses_distributed == expected.losses_distributed
    assert _typed(actual.metrics_distributed_fit) == _typed(expected.metrics_distributed_fit)
    assert _typed(actual.metrics_distributed) == _typed(expected.metrics_distributed)


# --- Stamen server side ----------------------------------------------------------------------


class RecordingFedAvg(FedAvg):
    """Stamen's FedAvg, keeping each round's aggregate and failure counts."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[tuple[int, list[np.ndarray]]] = []
        self.fit_failures: list[int] = []
        self.evaluate_failures: list[int] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.fit_failures.append(len(failures))
        if parameters is not None:
            self.rounds.append((server_round, parameters_to_ndarrays(parameters)))
        return parameters, metrics

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        self.evaluate_failures.append(len(failures))
        return super().aggregate_evaluate(server_round, results, failures)


def stamen_strategy(initial: str) -> RecordingFedAvg:
    """The scenario's FedAvg on Stamen; ``initial`` is ``"given"`` or ``"client"``."""
    n = len(scenario.CLIENT_IDS)
    return RecordingFedAvg(
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=(
            ndarrays_to_parameters(scenario.initial_ndarrays()) if initial == "given" else None
        ),
        on_fit_config_fn=scenario.fit_config,
        on_evaluate_config_fn=scenario.evaluate_config,
        fit_metrics_aggregation_fn=scenario.aggregate_fit_metrics,
        evaluate_metrics_aggregation_fn=scenario.aggregate_evaluate_metrics,
    )


@contextlib.contextmanager
def stamen_server(initial: str) -> Iterator[tuple[Any, RecordingFedAvg]]:
    """A Stamen server on 127.0.0.1 port 0 running the scenario; yields (handle, strategy)."""
    strategy = stamen_strategy(initial)
    with running_server(
        config=fl.server.ServerConfig(num_rounds=scenario.NUM_ROUNDS, round_timeout=ROUND_TIMEOUT),
        strategy=strategy,
        client_manager=SimpleClientManager(wait_timeout=CLIENT_WAIT_TIMEOUT),
    ) as handle:
        yield handle, strategy


# --- Stamen client side ----------------------------------------------------------------------


class ScenarioClient(fl.client.NumPyClient):
    """``scenario``'s client ``client_id`` as a Stamen NumPyClient; logs each call."""

    def __init__(self, client_id: int, events: list[str]) -> None:
        self.client_id = client_id
        self.events = events

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        self.events.append("get_parameters")
        return scenario.get_parameters(self.client_id)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.events.append(f"fit {config.get('round')}")
        return scenario.fit(self.client_id, parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.events.append(f"evaluate {config.get('round')}")
        return scenario.evaluate(self.client_id, parameters, config)


class StamenNode:
    """``stamen.client.start_client`` running scenario client ``client_id`` in a thread.

    ``max_retries=0``: if the server goes away (a failed test kills it), the node gives up
    at once instead of reconnecting forever, so its thread always ends.
    """

    def __init__(self, client_id: int, address: str) -> None:
        self.client_id = client_id
        self.address = address
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"stamen-node-{client_id}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            fl.client.start_client(
                server_address=self.address,
                client_fn=lambda _context: ScenarioClient(self.client_id, self.events).to_client(),
                insecure=True,
                transport="grpc-bidi",
                max_retries=0,
            )
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float) -> None:
        """Wait for ``start_client`` to return; fail if it raised or is still running."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), (
            f"Stamen node {self.client_id}: start_client still running after {timeout:g} s"
        )
        if self.error is not None:
            raise AssertionError(
                f"Stamen node {self.client_id}: start_client raised {self.error!r}"
            ) from self.error


def describe_nodes(nodes: list[StamenNode]) -> str:
    """State of each node, for failure messages."""
    return "\n".join(
        f"--- Stamen node {n.client_id}: running={n.thread.is_alive()} error={n.error!r} "
        f"calls={n.events}"
        for n in nodes
    )


def start_stamen_nodes(address: str) -> list[StamenNode]:
    """One Stamen node per scenario client, connected to ``address``."""
    return [StamenNode(k, address) for k in scenario.CLIENT_IDS]


def join_nodes(nodes: list[StamenNode], timeout: float) -> list[StamenNode]:
    """Join every node's thread (bounded); return the ones still running."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        node.thread.join(remaining(deadline))
    return [node for node in nodes if node.thread.is_alive()]


def flower_client_argv(python: Path, address: str, client_id: int) -> list[str]:
    """Command line of ``peers/flower_client.py`` for scenario client ``client_id``."""
    return [
        str(python),
        str(PEERS / "flower_client.py"),
        "--address",
        address,
        "--client-id",
        str(client_id),
    ]


def flower_server_argv(python: Path, out: Path, initial: str) -> list[str]:
    """Command line of ``peers/flower_server.py``."""
    return [
        str(python),
        str(PEERS / "flower_server.py"),
        "--out",
        str(out),
        "--initial",
        initial,
        "--round-timeout",
        str(ROUND_TIMEOUT),
    ]


def events_from_stdout(lines: list[str]) -> list[str]:
    """The ``EVENT ...`` lines a Flower client printed, without the prefix."""
    return [line.removeprefix("EVENT ") for line in lines if line.startswith("EVENT ")]
