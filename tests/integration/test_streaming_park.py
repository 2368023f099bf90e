"""The old model waits on disk while a streaming round receives its results.

Once every node has its instruction, the server's copy of the old model is only needed
if the round aggregates nothing: it is moved to a spill file (its tensors replaced in
place by views of the same bytes), and the memory it was in is free for the replies.
These tests run real rounds against a real server and check that it happens during the
round, that the old model's memory is really let go, and that training is exact, on
every transport: a grpc-rere or rest node has its instruction once it has pulled the
last frame, and a frame it pulls again afterwards is read from the spill file.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.ndarrays import parameters_to_ndarrays, received_buffer_of
from stamen.server import ServerConfig
from stamen.server.server import PARK_STREAMING_FROM
from stamen.server.spill import SpillStore, is_spilled
from stamen.testing import NodeThread, node_threads, running_server
from stamen.typing import Config, NDArrays, Scalar

WAIT = 60.0
LIMIT = 64 * 1024  # grpc_max_message_length: a 400 KB model travels in frames
SIZE = 100_000


class Adds(fl.client.NumPyClient):
    """Returns ``parameters + k`` with ``k`` examples; with ``waits``, it first waits
    until the server has parked the round's model, and records whether it did."""

    def __init__(self, k: int, waits: threading.Semaphore | None, seen: list[bool]) -> None:
        self.k, self.waits, self.seen = k, waits, seen

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if self.waits is not None:
            self.seen.append(self.waits.acquire(timeout=WAIT))
        return [p + np.float32(self.k) for p in parameters], self.k, {}


class WatchesTheModel(fl.server.strategy.FedAvg):
    """Streaming FedAvg (``aggregate_fit`` not overridden) that keeps a weak reference to
    the buffer each round's model lies in, and whether it was alive at aggregation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buffers: list[weakref.ref[Any] | None] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        buffer = received_buffer_of(np.frombuffer(parameters.tensors[0], np.uint8))
        self.buffers.append(None if buffer is None else weakref.ref(buffer))
        return super().configure_fit(server_round, parameters, client_manager)


TRANSPORTS = ("grpc-bidi", "grpc-rere", "rest")


def _run(
    nodes_k: tuple[int, ...],
    waits: threading.Semaphore | None,
    seen: list[bool],
    transport: str = "grpc-bidi",
) -> Any:
    """A 3-round streaming FedAvg run on ``transport`` with one node per ``k``; returns
    the strategy, the server's final model, and whether each park call parked."""
    initial = [np.zeros(SIZE, dtype=np.float32)]
    strategy = WatchesTheModel(
        min_fit_clients=len(nodes_k),
        min_available_clients=len(nodes_k),
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(initial),
    )
    assert strategy.fit_accumulator(1) is not None  # the round streams
    parks: list[tuple[bool, bool]] = []  # (parked, the model's old buffer freed)
    with running_server(
        config=ServerConfig(num_rounds=3),
        strategy=strategy,
        grpc_max_message_length=LIMIT,
        rest=transport == "rest",
    ) as srv:
        store = SpillStore(budget=0)
        park = store.park

        def parking(parameters: Any) -> bool:
            parked = park(parameters)
            if parked:
                assert is_spilled(parameters)  # in place: the same object, on disk
                watched = strategy.buffers[-1]
                gc.collect()
                parks.append((True, watched is not None and watched() is None))
                if waits is not None:
                    waits.release(len(nodes_k))
            return parked

        store.park = parking  # type: ignore[method-assign]
        srv.server.spill = store
        with node_threads() as nodes:
            for k in nodes_k:
                client = Adds(k, waits, seen).to_client()
                nodes.append(
                    NodeThread(
                        {
                            "server_address": srv.address_for(transport),
                            "transport": transport,
                            "client": client,
                            "grpc_max_message_length": LIMIT,
                        }
                    ).start()
                )
            srv.result(WAIT)
            for node in nodes:
                assert node.join(WAIT) is None
        model = parameters_to_ndarrays(srv.server.parameters)
        assert not is_spilled(srv.server.parameters)  # the new model, in memory
    return strategy, model, parks


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_streaming_round_parks_the_old_model_once_every_node_has_it(transport: str) -> None:
    waits = threading.Semaphore(0)
    seen: list[bool] = []
    strategy, model, parks = _run((1, 2, 3), waits, seen, transport)
    # Every node replied only after its round's park: the model went to disk mid-round.
    assert seen == [True] * 9
    # Rounds 2 and 3 sent a model computed in a received buffer: parked, it was freed
    # (round 1's initial model is plain bytes: nothing to watch).
    assert strategy.buffers[0] is None
    assert [freed for _, freed in parks[1:]] == [True, True], parks
    # (1 + 4 + 9) / 6 = 7/3 a round, as if nothing had moved.
    np.testing.assert_allclose(model[0], np.full(SIZE, 7.0, np.float32), rtol=1e-6)


def test_a_streaming_round_of_two_nodes_keeps_the_model_in_memory() -> None:
    """With two replies to come the write would cost more than it saves
    (``PARK_STREAMING_FROM``): nothing is parked, and the rounds train the same."""
    assert PARK_STREAMING_FROM == 3
    seen: list[bool] = []
    _, model, parks = _run((1, 2), None, seen)
    assert parks == []
    # (1 + 4) / 3 = 5/3 a round
    np.testing.assert_allclose(model[0], np.full(SIZE, 5.0, np.float32), rtol=1e-6)


LATE = 1.5
"""Seconds the last node's instruction is said to be with it late, unless a second reply
comes in before (what the hold must prevent)."""


def test_replies_wait_for_the_park_when_the_last_node_has_its_model_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first nodes reply while the last is still receiving its model: until the old
    model is parked, only the first reply is received (it becomes the running sum), so
    the old model, the sum and a reply being received are never in memory together."""
    from stamen.server import client_proxy
    from stamen.server.fleet.slots import ReceiveSlots

    events: list[tuple[str, int]] = []  # ("round" | "admit" | "park", seq)
    changed = threading.Condition()
    helpers: list[threading.Thread] = []

    def admits_this_round() -> int:
        start = max(i for i, (kind, _) in enumerate(events) if kind == "round")
        return sum(kind == "admit" for kind, _ in events[start:])

    real_track = client_proxy.Deliveries.track
    tracked: weakref.WeakKeyDictionary[client_proxy.Deliveries, int] = weakref.WeakKeyDictionary()

    def track(self: client_proxy.Deliveries) -> Any:
        sent, ended = real_track(self)
        tracked[self] = count = tracked.get(self, 0) + 1  # this round's instructions
        if count == 1:
            with changed:
                events.append(("round", 0))
        if count < 4:
            return sent, ended

        def late() -> None:  # the last node has its model once 2 replies are in, or LATE
            with changed:
                changed.wait_for(lambda: admits_this_round() >= 2, LATE)
            sent()

        def sent_late() -> None:
            helper = threading.Thread(target=late, daemon=True)
            helpers.append(helper)
            helper.start()

        return sent_late, ended

    real_acquire = ReceiveSlots.acquire

    async def acquire(self: ReceiveSlots, seq: int) -> Any:
        admission = await real_acquire(self, seq)
        with changed:
            events.append(("admit", seq))
            changed.notify_all()
        return admission

    monkeypatch.setattr(client_proxy.Deliveries, "track", track)
    monkeypatch.setattr(ReceiveSlots, "acquire", acquire)
    real_park = SpillStore.park

    def park(self: SpillStore, parameters: Any) -> bool:
        with changed:
            events.append(("park", 0))
        return real_park(self, parameters)

    monkeypatch.setattr(SpillStore, "park", park)
    try:
        _, model, parks = _run((1, 2, 3, 4), None, [])
    finally:
        for helper in helpers:
            helper.join(WAIT)
    assert len(parks) == 3 and not any(h.is_alive() for h in helpers)
    # (The run's end sends ReconnectIns, tracked too: a "round" with nothing in it.)
    rounds = [r for r in " ".join(kind for kind, _ in events).split("round") if r.strip()]
    assert len(rounds) == 3, events
    for steps in rounds:
        # One reply may come before the park; the others only after it.
        assert steps.split() in (
            ["admit", "park", "admit", "admit", "admit"],
            ["park", "admit", "admit", "admit", "admit"],
        ), events
    # (1 + 4 + 9 + 16) / 10 = 3 a round
    np.testing.assert_allclose(model[0], np.full(SIZE, 9.0, np.float32), rtol=1e-6)
