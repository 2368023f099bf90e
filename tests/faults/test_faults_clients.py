"""Client faults: nodes killed mid-fit, too few nodes left, late joiners, slow nodes.

Nodes that get killed are real processes (``fault_node.py``) running ``start_client``: a
node killed with SIGKILL gets no chance to say goodbye, so the server must notice on its
own: at once on grpc-bidi (the kernel resets the stream), after the heartbeat timeout on
grpc-rere and rest, or at ``round_timeout``, whichever comes first. Late and slow nodes
run in threads. Nothing here waits on a sleep: the tests wait on the nodes' stdout lines,
on events in their ``fit`` and on the strategy's round events, all bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fault_tools import (
    WAIT,
    FaultFedAvg,
    HoldingClient,
    NodeProcess,
    WatchedClientManager,
    expected_parameters,
    node_processes,
)

from stamen.errors import ConnectionLost, NotEnoughClients, Timeout
from stamen.ndarrays import parameters_to_ndarrays
from stamen.server import ServerConfig
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import NodeThread, RunningServer, node_threads, running_server
from stamen.testing.conformance import AddClient

# Liveness of pull-based nodes in these tests: a node silent for 1 s is dropped.
SHORT = FleetTiming(heartbeat_interval=0.2, heartbeat_timeout=1.0, poll_timeout=2.0)
# A heartbeat timeout longer than the round timeouts below, so that round_timeout fires
# first (the dead node is still dropped before the end of the run).
LONG = FleetTiming(heartbeat_interval=0.5, heartbeat_timeout=5.0, poll_timeout=2.0)
# Round timeouts: long enough for a live node on a loaded machine to answer.
ROUND_TIMEOUT = 2.0
# Slack for a loaded 2-core machine, on top of the timeout that should fire.
SLACK = 3.0

StartNode = Callable[..., NodeProcess]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    """Start node processes; each is killed and reaped at teardown."""
    with node_processes(tmp_path) as start:
        yield start


def _thread(srv: RunningServer, transport: str, client: AddClient) -> NodeThread:
    kwargs = {"server_address": srv.address_for(transport), "transport": transport}
    return NodeThread({**kwargs, "client": client.to_client()}).start()


def _assert_params(srv: RunningServer, rounds: list[list[int]]) -> None:
    got = parameters_to_ndarrays(srv.server.parameters)
    for a, b in zip(got, expected_parameters(rounds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# (transport, FleetTiming, round_timeout, bound on kill -> round aggregated, the failure
# the round records); the id says what notices the dead node. grpc-bidi has no timeout
# configured at all: any bound proves that it does not wait for one.
KILL_CASES = [
    pytest.param("grpc-bidi", None, None, SLACK, ConnectionLost, id="grpc-bidi-stream-reset"),
    pytest.param("grpc-rere", SHORT, None, 1.0 + SLACK, ConnectionLost, id="grpc-rere-heartbeat"),
    pytest.param("rest", SHORT, None, 1.0 + SLACK, ConnectionLost, id="rest-heartbeat"),
    pytest.param(
        "grpc-rere", LONG, ROUND_TIMEOUT, ROUND_TIMEOUT + SLACK, Timeout, id="grpc-rere-timeout"
    ),
    pytest.param("rest", LONG, ROUND_TIMEOUT, ROUND_TIMEOUT + SLACK, Timeout, id="rest-timeout"),
]


@pytest.mark.parametrize(("transport", "timing", "round_timeout", "bound", "error"), KILL_CASES)
def test_node_killed_mid_fit_is_a_failure_and_the_round_completes(
    start_node: StartNode,
    transport: str,
    timing: FleetTiming | None,
    round_timeout: float | None,
    bound: float,
    error: type[BaseException],
) -> None:
    """1 of 3 node processes is SIGKILLed inside its first fit: round 1 completes with the
    2 survivors within the bound (grpc-bidi at once, grpc-rere/rest at the heartbeat
    timeout or at round_timeout), the dead node is one failure (ConnectionLost, or Timeout
    at round_timeout), round 2 runs with the survivors, the model is their FedAvg and the
    survivors' start_client returns normally."""
    strategy = FaultFedAvg(
        start_with=3, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2
    )
    config = ServerConfig(num_rounds=2, round_timeout=round_timeout)
    manager = WatchedClientManager()
    with running_server(
        config=config, strategy=strategy, client_manager=manager, rest=True, timing=timing
    ) as srv:
        address = srv.address_for(transport)
        survivors = [start_node(address, transport, k) for k in (1, 2)]
        victim = start_node(address, transport, 3, hang_in_fit=1)
        victim.wait_line("HANG 1")
        killed_at = time.monotonic()
        victim.kill()
        strategy.wait_round(1)
        noticed = strategy.fit_ended[1] - killed_at
        history = srv.result(WAIT)
        exits = [node.wait_exit() for node in survivors]
    assert noticed < bound, f"the round waited {noticed:.2f} s for a dead node"
    assert strategy.ks(1) == [1, 2] and strategy.ks(2) == [1, 2]
    (failure,) = strategy.failures(1)
    assert isinstance(failure, error), failure
    if timing is SHORT:
        assert "no heartbeat" in str(failure), failure
    # Until its heartbeat timeout drops it, a dead node may be picked again (and fail again).
    assert all(isinstance(f, Timeout | ConnectionLost) for f in strategy.failures(2))
    assert [r for r, _ in history.losses_distributed] == [1, 2]
    _assert_params(srv, [[1, 2], [1, 2]])
    assert exits == ["EXIT ok", "EXIT ok"]


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_too_few_nodes_left_stops_the_run_with_a_clear_error(
    start_node: StartNode, transport: str
) -> None:
    """2 nodes, a strategy that needs 2, one SIGKILLed mid-fit: round 1's fit still
    completes with the survivor, then the next sampling (round 1's evaluation) waits only
    SimpleClientManager.wait_timeout (1 s) for a second node and the run stops with
    NotEnoughClients saying how many it needed and had; the survivor is told that the run
    failed, and why (start_client raises RunError with the server's reason)."""
    strategy = FaultFedAvg(
        start_with=2, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2
    )
    manager = WatchedClientManager(wait_timeout=1.0)
    with running_server(
        config=ServerConfig(num_rounds=3),
        strategy=strategy,
        client_manager=manager,
        rest=True,
        timing=SHORT,
    ) as srv:
        address = srv.address_for(transport)
        survivor = start_node(address, transport, 1)
        victim = start_node(address, transport, 2, hang_in_fit=1)
        victim.wait_line("HANG 1")
        killed_at = time.monotonic()
        victim.kill()
        with pytest.raises(NotEnoughClients, match=r"needed 2 connected client\(s\), had 1"):
            srv.result(WAIT)
        stopped = time.monotonic() - killed_at
        assert survivor.wait_exit().startswith(
            "EXIT error RunError: the server ended the run as failed: NotEnoughClients: "
            "needed 2 connected client(s), had 1"
        )
    # Noticing the dead node (at most the heartbeat timeout) + wait_timeout, plus slack.
    assert stopped < SHORT.silence_limit + 1.0 + SLACK, stopped
    assert strategy.ks(1) == [1]
    assert len(strategy.rounds) == 1


def test_round_with_a_dead_node_fails_and_the_run_goes_on(start_node: StartNode) -> None:
    """With accept_failures=False, the round in which a node is SIGKILLed is not
    aggregated (the model stays as it was; the reason is logged) and the run goes on with
    the survivors: the final model is one round of the survivors' FedAvg."""
    strategy = FaultFedAvg(
        start_with=3,
        min_fit_clients=2,
        min_evaluate_clients=2,
        min_available_clients=2,
        accept_failures=False,
    )
    with running_server(config=ServerConfig(num_rounds=2), strategy=strategy) as srv:
        survivors = [start_node(srv.address, "grpc-bidi", k) for k in (1, 2)]
        victim = start_node(srv.address, "grpc-bidi", 3, hang_in_fit=1)
        victim.wait_line("HANG 1")
        victim.kill()
        srv.result(WAIT)
        exits = [node.wait_exit() for node in survivors]
    assert strategy.ks(1) == [1, 2] and len(strategy.failures(1)) == 1
    assert strategy.ks(2) == [1, 2] and not strategy.failures(2)
    _assert_params(srv, [[1, 2]])  # round 1 was refused
    assert exits == ["EXIT ok", "EXIT ok"]


def test_node_joining_mid_run_is_used_from_the_next_round() -> None:
    """A node that connects while round 1 is under way (the first two nodes on grpc-bidi
    and grpc-rere, the late one on rest) is not part of round 1, is part of round 2 with
    the current global model, and the model is exactly the FedAvg of who took part in each
    round."""
    strategy = FaultFedAvg(
        start_with=2, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2
    )
    manager = WatchedClientManager()
    first = HoldingClient(1)
    with (
        running_server(
            config=ServerConfig(num_rounds=2), strategy=strategy, client_manager=manager, rest=True
        ) as srv,
        node_threads() as nodes,
    ):
        try:
            for transport, client in (("grpc-bidi", first), ("grpc-rere", AddClient(2))):
                nodes.append(_thread(srv, transport, client))
            assert first.entered.wait(WAIT)  # round 1 is under way, and waits for this node
            nodes.append(_thread(srv, "rest", AddClient(3)))
            manager.wait_count(lambda n: n == 3, WAIT, "the late node connects")
        finally:
            first.release.set()
        srv.result(WAIT)
        outcomes = [node.join(WAIT) for node in nodes]
    assert strategy.ks(1) == [1, 2]
    assert strategy.ks(2) == [1, 2, 3]
    _assert_params(srv, [[1, 2], [1, 2, 3]])
    assert outcomes == [None] * 3


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_slow_node_never_blocks_the_others(transport: str) -> None:
    """A node stuck in fit is a Timeout failure at round_timeout and the round completes
    with the others; released afterwards, its late reply is discarded (it does not leak
    into a later round), it serves round 2 normally, and every node exits normally."""
    strategy = FaultFedAvg(
        start_with=3, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2
    )
    config = ServerConfig(num_rounds=2, round_timeout=ROUND_TIMEOUT)
    slow = HoldingClient(3)
    with (
        running_server(config=config, strategy=strategy, rest=True) as srv,
        node_threads() as nodes,
    ):
        try:
            for client in (AddClient(1), AddClient(2), slow):
                nodes.append(_thread(srv, transport, client))
            assert slow.entered.wait(WAIT)
            strategy.wait_round(1)
        finally:
            slow.release.set()
        srv.result(WAIT)
        outcomes = [node.join(WAIT) for node in nodes]
    assert ROUND_TIMEOUT - 0.1 < strategy.round_seconds(1) < ROUND_TIMEOUT + SLACK
    assert strategy.ks(1) == [1, 2]
    (failure,) = strategy.failures(1)
    assert isinstance(failure, Timeout) and "no reply to FitIns" in str(failure)
    assert strategy.ks(2) == [1, 2, 3] and not strategy.failures(2)
    _assert_params(srv, [[1, 2], [1, 2, 3]])
    assert outcomes == [None] * 3
