"""A Flower 1.12 server counts a Stamen node's failing fit as a failure, over grpc-bidi.

Stamen's own status for "the client's code raised" (CLIENT_ERROR, 5) is unknown to Flower
1.12, which reads it as OK; towards a Flower server a Stamen node sends the
FIT_NOT_IMPLEMENTED code Flower knows instead (``transport/grpc_bidi._for_flower_server``).
Flower's ``start_server`` (FedAvg, 2 rounds, ``peers/flower_server.py``) runs with Stamen
nodes of ``peers/scenario.py``, some of whose ``fit`` raise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stamen as fl

from ._harness import (
    EXIT_TIMEOUT,
    PORT_TIMEOUT,
    RUN_TIMEOUT,
    Outcome,
    Peer,
    ScenarioClient,
    StamenNode,
    describe_nodes,
    flower_python,
    flower_server_argv,
    join_nodes,
    remaining,
)
from .peers import scenario

pytestmark = pytest.mark.interop


class FailingFitClient(ScenarioClient):
    """Scenario client whose ``fit`` raises (evaluation works)."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.events.append(f"fit {config.get('round')}")
        raise RuntimeError(f"client {self.client_id}: fit fails on purpose")


class FailingFitNode(StamenNode):
    """A Stamen grpc-bidi node running :class:`FailingFitClient`."""

    def _run(self) -> None:
        try:
            fl.client.start_client(
                server_address=self.address,
                client_fn=lambda _c: FailingFitClient(self.client_id, self.events).to_client(),
                insecure=True,
                transport="grpc-bidi",
                max_retries=0,
            )
        except BaseException as exc:  # reported by finish()
            self.error = exc


def run_flower_server(tmp_path: Path, failing: set[int]) -> Outcome:
    """Flower ``start_server`` (subprocess) with one Stamen node per scenario client, those
    in ``failing`` raising in fit; every wait bounded."""
    python = flower_python()
    out = tmp_path / "flower-server-result.json"
    server = Peer("flower-server", flower_server_argv(python, out, "given"), tmp_path)
    nodes: list[StamenNode] = []
    try:
        port = int(server.wait_for_line("PORT ", PORT_TIMEOUT).split()[1])
        address = f"127.0.0.1:{port}"
        nodes = [
            (FailingFitNode if k in failing else StamenNode)(k, address)
            for k in scenario.CLIENT_IDS
        ]
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
        server.stop()
        leftover = join_nodes(nodes, EXIT_TIMEOUT)
    assert not leftover, f"Stamen nodes still running: {[n.client_id for n in leftover]}"
    return Outcome.from_flower_json(out, {n.client_id: n.events for n in nodes})


def test_one_failing_stamen_node_is_one_failure_per_round(tmp_path: Path) -> None:
    """Flower 1.12 FedAvg, 2 rounds, Stamen nodes 1 (fit raises) and 2 (good): Flower
    counts exactly one fit failure per round, and each round's model is what node 2 alone
    gives (its update, +2 per round, not ``[]``); both nodes evaluate every round and end
    normally on Flower's ReconnectIns."""
    outcome = run_flower_server(tmp_path, failing={1})
    assert outcome.fit_failures == [1, 1]
    assert outcome.evaluate_failures == [0, 0]
    model = scenario.initial_ndarrays()
    assert [r for r, _ in outcome.rounds] == [1, 2]
    for server_round, arrays in outcome.rounds:
        model = [layer + np.float32(2) for layer in model]
        assert len(arrays) == len(model), f"round {server_round}: {arrays}"
        for got, want in zip(arrays, model, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want, err_msg=f"round {server_round}")
    assert outcome.events == {
        1: ["fit 1", "evaluate 1", "fit 2", "evaluate 2"],
        2: ["fit 1", "evaluate 1", "fit 2", "evaluate 2"],
    }


def test_every_stamen_node_failing_leaves_the_model_unchanged(tmp_path: Path) -> None:
    """Flower 1.12 FedAvg, 2 rounds, every Stamen node's fit raises: the Flower server
    neither hangs nor crashes (it finishes within the bounded wait and exits 0), counts
    every node as a failure each round, aggregates nothing, and the nodes evaluate the
    unchanged initial model (the loss each round is that of the initial model)."""
    outcome = run_flower_server(tmp_path, failing=set(scenario.CLIENT_IDS))
    n = len(scenario.CLIENT_IDS)
    assert outcome.fit_failures == [n, n]
    assert outcome.rounds == []  # FedAvg had no result: Flower keeps the model
    assert outcome.evaluate_failures == [0, 0]
    # Client k's loss is p[0][0, 0] + p[1][-1] + k: (1 * (1.0 + 1) + 3 * (1.0 + 2)) / 4.
    initial = scenario.initial_ndarrays()
    base = float(initial[0][0, 0] + initial[1][-1])
    weights = scenario.NUM_EXAMPLES
    expected_loss = sum(weights[k] * (base + k) for k in weights) / sum(weights.values())
    assert outcome.losses_distributed == [(1, expected_loss), (2, expected_loss)]
