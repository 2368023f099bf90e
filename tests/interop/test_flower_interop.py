"""Stamen and real Flower 1.12 train the same federation over grpc-bidi, in both directions.

The federation is ``peers/scenario.py``: two deterministic clients whose FedAvg results are
exact in float32, so the runs are compared bit for bit:

* Flower's ``start_server`` (subprocess, Flower venv) with two Stamen ``start_client`` nodes;
* Stamen's server with two Flower ``start_client`` nodes (subprocesses, Flower venv);
* Stamen with Stamen, the reference.

Each is run with the initial model given to FedAvg, and without it, so that the server asks
one client with ``GetParametersIns``. Every server listens on 127.0.0.1 port 0. A last test
checks how a Flower server reads the DisconnectRes with which Stamen nodes end the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from stamen.common import parameters_to_ndarrays

from ._harness import (
    EXIT_TIMEOUT,
    PORT_TIMEOUT,
    RUN_TIMEOUT,
    Outcome,
    Peer,
    assert_same_run,
    describe_nodes,
    events_from_stdout,
    flower_client_argv,
    flower_python,
    flower_server_argv,
    join_nodes,
    remaining,
    stamen_server,
    start_stamen_nodes,
)
from .peers import scenario

pytestmark = pytest.mark.interop

INITIAL_MODES = [
    pytest.param("given", id="initial-given"),
    pytest.param("client", id="initial-from-client"),
]

# Worked out by hand from scenario.py. Each round adds (1 * (+1) + 3 * (+2)) / 4 = 1.75 to
# every weight of the initial model [[0.5, -1, 2.25], [0, 3.5, -0.75]], [0.125 .. 0.5].
EXPECTED_ROUNDS = {
    1: [
        np.array([[2.25, 0.75, 4.0], [1.75, 5.25, 1.0]], dtype=np.float32),
        np.array([1.875, 2.0, 2.125, 2.25], dtype=np.float32),
    ],
    2: [
        np.array([[4.0, 2.5, 5.75], [3.5, 7.0, 2.75]], dtype=np.float32),
        np.array([3.625, 3.75, 3.875, 4.0], dtype=np.float32),
    ],
}
# Round r: client k's loss is p[0][0,0] + p[1][-1] + k with the round-r model:
# round 1: 2.25 + 2.25 = 4.5 -> (1 * 5.5 + 3 * 6.5) / 4 = 6.25;
# round 2: 4.0 + 4.0 = 8.0 -> (1 * 9.0 + 3 * 10.0) / 4 = 9.75.
EXPECTED_LOSSES = [(1, 6.25), (2, 9.75)]
EXPECTED_FIT_METRICS = {
    "examples": [(1, 4), (2, 4)],
    "weighted_client": [(1, 7), (2, 7)],
    "round": [(1, 1), (2, 2)],
    "names": [(1, "c1,c2"), (2, "c1,c2")],
    "any_even": [(1, True), (2, True)],
    "raw": [(1, b"\x01\x02"), (2, b"\x01\x02")],
    "scale_sum": [(1, 1.5), (2, 1.5)],
    "big_max": [(1, 2**64 - 1), (2, 2**64 - 1)],
}
EXPECTED_EVALUATE_METRICS = {
    "examples": [(1, 4), (2, 4)],
    "weighted_client": [(1, 7), (2, 7)],
    "round": [(1, 1), (2, 2)],
}
TRAINING_EVENTS = ["fit 1", "evaluate 1", "fit 2", "evaluate 2"]


def assert_expected(outcome: Outcome, initial: str) -> None:
    """The run produced exactly the hand-computed models, losses, metrics and calls."""
    assert [r for r, _ in outcome.rounds] == [1, 2]
    for server_round, arrays in outcome.rounds:
        expected = EXPECTED_ROUNDS[server_round]
        assert [a.dtype for a in arrays] == [np.dtype(np.float32)] * 2
        assert [a.shape for a in arrays] == [(2, 3), (4,)]
        for got, want in zip(arrays, expected, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"round {server_round}")
    assert outcome.fit_failures == [0, 0]
    assert outcome.evaluate_failures == [0, 0]
    assert outcome.losses_distributed == EXPECTED_LOSSES
    typed = {
        k: [(r, type(v), v) for r, v in vs] for k, vs in outcome.metrics_distributed_fit.items()
    }
    assert typed == {k: [(r, type(v), v) for r, v in vs] for k, vs in EXPECTED_FIT_METRICS.items()}
    assert outcome.metrics_distributed == EXPECTED_EVALUATE_METRICS
    # Every client trained and evaluated in both rounds; GetParametersIns went to exactly
    # one client when the strategy had no initial model, and to none otherwise.
    assert set(outcome.events) == set(scenario.CLIENT_IDS)
    asked = [k for k, events in outcome.events.items() if events[:1] == ["get_parameters"]]
    assert len(asked) == (1 if initial == "client" else 0), outcome.events
    for client_id, events in outcome.events.items():
        prefix = ["get_parameters"] if client_id in asked else []
        assert events == prefix + TRAINING_EVENTS, f"client {client_id}: {events}"


def run_stamen_with_stamen(initial: str) -> Outcome:
    """Stamen server + two Stamen nodes (threads)."""
    nodes = []
    try:
        with stamen_server(initial) as (handle, strategy):
            nodes = start_stamen_nodes(handle.address)
            try:
                history = handle.result(RUN_TIMEOUT)
            except Exception as exc:
                raise AssertionError(
                    f"Stamen server run failed: {exc!r}\n{describe_nodes(nodes)}"
                ) from exc
            deadline = time.monotonic() + EXIT_TIMEOUT
            for node in nodes:
                node.finish(remaining(deadline))
            final = parameters_to_ndarrays(handle.server.parameters)
    finally:
        leftover = join_nodes(nodes, EXIT_TIMEOUT)
    assert not leftover, f"Stamen nodes still running: {[n.client_id for n in leftover]}"
    outcome = Outcome.from_stamen(strategy, history, {n.client_id: n.events for n in nodes})
    for got, want in zip(final, outcome.final, strict=True):
        np.testing.assert_array_equal(got, want, err_msg="Server.parameters after the run")
    return outcome


def run_flower_server_with_stamen_nodes(python: Path, tmp_path: Path, initial: str) -> Outcome:
    """Flower ``start_server`` (subprocess) + two Stamen nodes (threads)."""
    out = tmp_path / "flower-server-result.json"
    server = Peer("flower-server", flower_server_argv(python, out, initial), tmp_path)
    nodes = []
    try:
        port = int(server.wait_for_line("PORT ", PORT_TIMEOUT).split()[1])
        nodes = start_stamen_nodes(f"127.0.0.1:{port}")
        deadline = time.monotonic() + RUN_TIMEOUT
        for node in nodes:
            try:
                node.finish(remaining(deadline))
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\n{describe_nodes(nodes)}\n{server.describe()}"
                ) from exc
        status = server.finish(EXIT_TIMEOUT)
        assert status == 0, server.describe()
        assert "DONE" in server.stdout_lines, server.describe()
    finally:
        server.stop()  # kills it if still running: the nodes then fail fast (max_retries=0)
        leftover = join_nodes(nodes, EXIT_TIMEOUT)
    assert not leftover, f"Stamen nodes still running: {[n.client_id for n in leftover]}"
    return Outcome.from_flower_json(out, {n.client_id: n.events for n in nodes})


def run_stamen_server_with_flower_clients(python: Path, tmp_path: Path, initial: str) -> Outcome:
    """Stamen server + two Flower ``start_client`` nodes (subprocesses)."""
    clients: list[Peer] = []
    try:
        with stamen_server(initial) as (handle, strategy):
            clients = [
                Peer(f"flower-client-{k}", flower_client_argv(python, handle.address, k), tmp_path)
                for k in scenario.CLIENT_IDS
            ]
            try:
                history = handle.result(RUN_TIMEOUT)
            except Exception as exc:
                details = "\n".join(c.describe() for c in clients)
                raise AssertionError(f"Stamen server run failed: {exc!r}\n{details}") from exc
            deadline = time.monotonic() + EXIT_TIMEOUT
            for client in clients:
                status = client.finish(remaining(deadline))
                assert status == 0, client.describe()
                assert "DONE" in client.stdout_lines, client.describe()
            final = parameters_to_ndarrays(handle.server.parameters)
    finally:
        for client in clients:
            client.stop()
    events = {
        k: events_from_stdout(c.stdout_lines)
        for k, c in zip(scenario.CLIENT_IDS, clients, strict=True)
    }
    outcome = Outcome.from_stamen(strategy, history, events)
    for got, want in zip(final, outcome.final, strict=True):
        np.testing.assert_array_equal(got, want, err_msg="Server.parameters after the run")
    return outcome


@pytest.fixture(scope="module")
def stamen_reference() -> Outcome:
    """The pure-Stamen run (initial model given), which the interop runs must reproduce."""
    return run_stamen_with_stamen("given")


@pytest.mark.parametrize("initial", INITIAL_MODES)
def test_stamen_server_with_stamen_clients(initial: str, stamen_reference: Outcome) -> None:
    """Stamen server + 2 Stamen nodes, 2 FedAvg rounds over grpc-bidi, reach the exact
    hand-computed models, losses and metrics; every start_client returns normally; with no
    initial model exactly one node is asked for it (GetParametersIns)."""
    outcome = run_stamen_with_stamen(initial)
    assert_expected(outcome, initial)
    assert_same_run(outcome, stamen_reference)


@pytest.mark.parametrize("initial", INITIAL_MODES)
def test_flower_server_with_stamen_clients(
    initial: str, stamen_reference: Outcome, tmp_path: Path
) -> None:
    """Flower 1.12 ``start_server`` (FedAvg) trains 2 Stamen ``start_client`` nodes for 2
    rounds over grpc-bidi: Flower's aggregated models (both rounds, bit for bit), distributed
    losses and metrics (every Scalar kind both ways) equal the pure-Stamen run and the hand-
    computed values; the nodes return normally on Flower's final ReconnectIns and the Flower
    server exits 0. With no initial model, Flower's GetParametersIns reaches one Stamen node
    and its GetParametersRes is decoded by Flower."""
    python = flower_python()
    outcome = run_flower_server_with_stamen_nodes(python, tmp_path, initial)
    assert_expected(outcome, initial)
    assert_same_run(outcome, stamen_reference)
    # Every node answered Flower's final ReconnectIns before hanging up.
    assert len(outcome.disconnects) == len(scenario.CLIENT_IDS), outcome.disconnects
    assert all("reason" in d for d in outcome.disconnects), outcome.disconnects


@pytest.mark.parametrize("initial", INITIAL_MODES)
def test_stamen_server_with_flower_clients(
    initial: str, stamen_reference: Outcome, tmp_path: Path
) -> None:
    """Stamen's server (FedAvg) trains 2 real Flower 1.12 ``start_client`` nodes
    (grpc-bidi, insecure) for 2 rounds: the aggregated models (bit for bit), distributed
    losses and metrics equal the pure-Stamen run and the hand-computed values; both Flower
    clients exit 0 on Stamen's final ReconnectIns. With no initial model, Stamen's
    GetParametersIns reaches one Flower client and its GetParametersRes is decoded."""
    python = flower_python()
    outcome = run_stamen_server_with_flower_clients(python, tmp_path, initial)
    assert_expected(outcome, initial)
    assert_same_run(outcome, stamen_reference)


def test_flower_server_decodes_stamen_disconnect_as_flower_clients_do(tmp_path: Path) -> None:
    """A Flower 1.12 server reads the DisconnectRes of a Stamen node exactly as that of a
    Flower 1.12 client: reason RECONNECT. (Flower clients always send RECONNECT (1); Flower's
    server decodes any reason other than RECONNECT/POWER_DISCONNECTED/WIFI_UNAVAILABLE,
    ACK (4) included, as "UNKNOWN".)"""
    python = flower_python()
    outcome = run_flower_server_with_stamen_nodes(python, tmp_path, "given")
    assert outcome.disconnects == [{"reason": "RECONNECT"}] * len(scenario.CLIENT_IDS)
