"""Received models are used where they landed, on every transport.

A model received in frames lands in a ReceivedBuffer. The node hands its NumPyClient
writable arrays over that buffer (no copy of the model); the server's FedAvg keeps the
first reply of a round as its running mean where it lies and gives it back as the new
global model without encoding it again. These tests run real rounds and check the
memory is shared, the results exact, and that nothing else sees the reuse.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.client.client import Client
from stamen.messages import FitIns, FitRes
from stamen.ndarrays import ReceivedBuffer, parameters_to_ndarrays, received_buffer_of
from stamen.server import ServerConfig
from stamen.server.fleet.handler import RECEIVE_SLOTS, Fleet
from stamen.server.spill import is_spilled
from stamen.testing import NodeThread, node_threads, running_server
from stamen.testing.conformance import TRANSPORTS
from stamen.typing import Config, NDArrays, Scalar
from stamen.wire.frames import is_frame

WAIT = 60.0
LIMIT = 64 * 1024  # grpc_max_message_length: a 400 KB model travels in frames
SIZE = 100_000


class InPlaceClient(fl.client.NumPyClient):
    """Adds ``k`` to the arrays it is given, in place, and returns them; records what it
    was given."""

    def __init__(self, k: int, seen: list[dict[str, bool]]) -> None:
        self.k = k
        self.seen = seen

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.seen.append(
            {
                "writable": all(p.flags.writeable for p in parameters),
                "received": all(received_buffer_of(p) is not None for p in parameters),
            }
        )
        for p in parameters:
            p += np.float32(self.k)
        return parameters, self.k, {}


def _server(rounds: int, clients: int, strategy: fl.server.strategy.FedAvg | None = None) -> Any:
    """A server (grpc and rest) whose messages are bounded to LIMIT: the model is framed."""
    return running_server(
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy or _strategy(clients),
        grpc_max_message_length=LIMIT,
        rest=True,
    )


def _train(srv: Any, transport: str, seen: list[dict[str, bool]]) -> None:
    """Three InPlaceClient nodes (k = 1, 2, 3) on ``transport`` through the server's run."""
    with node_threads() as nodes:
        for k in (1, 2, 3):
            nodes.append(_node(srv, transport, InPlaceClient(k, seen).to_client()))
        srv.result(WAIT)
        for node in nodes:
            assert node.join(WAIT) is None


def _strategy(
    n: int, kind: type[fl.server.strategy.FedAvg] = fl.server.strategy.FedAvg
) -> fl.server.strategy.FedAvg:
    initial = [np.zeros(SIZE, dtype=np.float32), np.zeros((3, 2), dtype=np.float32)]
    return kind(
        min_fit_clients=n,
        min_available_clients=n,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(initial),
    )


async def _free_slots(fleet: Fleet) -> int:
    return fleet.slots.free


def _node(srv: Any, transport: str, client: Client) -> NodeThread:
    return NodeThread(
        {
            "server_address": srv.address_for(transport),
            "transport": transport,
            "client": client,
            "grpc_max_message_length": LIMIT,
        }
    ).start()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nodes_train_in_the_received_buffer_and_the_server_keeps_the_first_reply(
    transport: str,
) -> None:
    seen: list[dict[str, bool]] = []
    with _server(rounds=2, clients=3) as srv:
        _train(srv, transport, seen)
        parameters = srv.server.parameters
        # The kept buffer gave its receive slot back: otherwise each later reply waits
        # out the slots' patience, and the global model holds a slot for ever.
        # (Releases run on the Fleet's loop, in order, before this coroutine.)
        fleet = srv.service.fleet
        free = asyncio.run_coroutine_threadsafe(_free_slots(fleet), fleet.loop).result(WAIT)
        assert free == RECEIVE_SLOTS
        assert fleet.slots.late == 0
    # Every fit got writable arrays over the received message, not copies.
    assert len(seen) == 6
    assert all(s == {"writable": True, "received": True} for s in seen), seen
    # Each round adds (1 + 4 + 9) / 6 = 7/3: in-place training corrupted nothing.
    model = parameters_to_ndarrays(parameters)
    np.testing.assert_allclose(model[0], np.full(SIZE, 14 / 3, np.float32), rtol=1e-6)
    np.testing.assert_allclose(model[1], np.full((3, 2), 14 / 3, np.float32), rtol=1e-6)
    # The new global model is the first reply's buffer, read-only, not a new encoding.
    big = parameters.tensors[0]
    assert isinstance(big, memoryview) and big.readonly
    assert isinstance(big.obj, ReceivedBuffer)


class WrappingClient(Client):
    """A user's Client around a NumPyClient: reads ``ins.parameters`` after the fit."""

    def __init__(self, inner: Client, before_after: list[tuple[NDArrays, NDArrays]]) -> None:
        self.inner = inner
        self.before_after = before_after

    def fit(self, ins: FitIns) -> FitRes:
        before = parameters_to_ndarrays(ins.parameters)
        res = self.inner.fit(ins)
        self.before_after.append((before, parameters_to_ndarrays(ins.parameters)))
        return res


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_users_client_around_a_numpy_client_keeps_its_instruction_intact(
    transport: str,
) -> None:
    """Only Stamen's own adapter, called by the node itself, trains in the received
    bytes: a NumPyClient inside a user's Client gets copies, so ``ins.parameters`` read
    after the fit still holds the global model."""
    seen: list[dict[str, bool]] = []
    before_after: list[tuple[NDArrays, NDArrays]] = []
    with (
        _server(rounds=1, clients=1) as srv,
        node_threads() as nodes,
    ):
        client = WrappingClient(InPlaceClient(5, seen).to_client(), before_after)
        nodes.append(_node(srv, transport, client))
        srv.result(WAIT)
        assert nodes[0].join(WAIT) is None
    assert seen == [{"writable": True, "received": False}]
    [(before, after)] = before_after
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)
        assert not a.any()  # the initial zeros, not the trained values
    np.testing.assert_array_equal(
        parameters_to_ndarrays(srv.server.parameters)[0], np.full(SIZE, 5, np.float32)
    )


class SavesTheModel(fl.server.strategy.FedAvg):
    """A FedAvg subclass overriding aggregate_fit (no streaming): records its results."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spilled: list[bool] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.spilled += [is_spilled(res.parameters) for _, res in results]
        return super().aggregate_fit(server_round, results, failures)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_results_kept_for_a_subclass_are_received_straight_into_spill_files(
    transport: str,
) -> None:
    """A strategy without streaming gets every result at once: framed ones are written
    into spill files as they arrive (no copy, the receive slot back at once), and the
    round aggregates them exactly."""
    strategy = _strategy(3, SavesTheModel)
    assert isinstance(strategy, SavesTheModel)
    with _server(rounds=2, clients=3, strategy=strategy) as srv:
        _train(srv, transport, [])
        fleet = srv.service.fleet
        free = asyncio.run_coroutine_threadsafe(_free_slots(fleet), fleet.loop).result(WAIT)
        assert free == RECEIVE_SLOTS and fleet.slots.late == 0
        model = parameters_to_ndarrays(srv.server.parameters)
    assert strategy.spilled == [True] * 6
    np.testing.assert_allclose(model[0], np.full(SIZE, 14 / 3, np.float32), rtol=1e-6)
    np.testing.assert_allclose(model[1], np.full((3, 2), 14 / 3, np.float32), rtol=1e-6)


def test_grpc_bidi_replies_waiting_their_turn_stay_with_their_nodes() -> None:
    """On grpc-bidi a large reply's first frame is read only once the reply holds its
    receive slot: replies waiting their turn are not held, a frame each, by the server
    (fifty 40 MB replies held 200 MB so). Every frame the fleet takes arrives with the
    node's slot held."""
    seen: list[dict[str, bool]] = []
    unslotted: list[str] = []
    with _server(rounds=2, clients=3) as srv:
        fleet = srv.service.fleet
        assemble = fleet.assemble

        async def watched(node: Any, task: Any, data: bytes) -> Any:
            if is_frame(data) and node.slot is None:
                unslotted.append(node.cid)
            return await assemble(node, task, data)

        fleet.assemble = watched  # type: ignore[method-assign]
        _train(srv, "grpc-bidi", seen)
        free = asyncio.run_coroutine_threadsafe(_free_slots(fleet), fleet.loop).result(WAIT)
    assert len(seen) == 6  # three nodes, two rounds: every reply came in
    assert unslotted == [], f"frames read before their reply held a slot: {unslotted}"
    assert free == RECEIVE_SLOTS and fleet.slots.late == 0
