"""Registered virtual nodes are cheap: 100,000 of them cost a few hundred bytes each.

Memory is measured with :mod:`tracemalloc` (bytes allocated by Python, not timing): the
proxies ``start_simulation`` registers (:func:`stamen.simulation.app.virtual_clients`) and
their entries in the client manager.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import numpy as np

from stamen.client import Client, NumPyClient
from stamen.context import Context, MetricsRecord
from stamen.messages import FitIns
from stamen.ndarrays import ndarrays_to_parameters
from stamen.server.client_manager import SimpleClientManager
from stamen.simulation import SequentialBackend
from stamen.simulation.app import virtual_clients

REGISTERED = 100_000
BYTES_PER_CLIENT = 450
"""The bound: ~310 bytes measured (slotted proxy 120, cid 54, node id 32, partition
config 48, client manager entry ~40, list slot 8); each node held a dict of properties,
one of run config and one of node config with two strings (~1 KB) before."""


class Adder(NumPyClient):
    def __init__(self, context: Context, keep: bool) -> None:
        self.node_context, self.keep = context, keep

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict]:
        if self.keep:
            self.node_context.state.metrics_records["seen"] = MetricsRecord({"fits": 1})
        return [p + 1 for p in parameters], 1, {}


def test_registered_clients_cost_less_than_the_bound() -> None:
    """100,000 registered virtual nodes allocate under BYTES_PER_CLIENT bytes each."""
    backend = SequentialBackend()
    manager = SimpleClientManager()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        proxies = []
        for proxy in virtual_clients(
            REGISTERED, client_fn=lambda c: Adder(c, False).to_client(), backend=backend
        ):
            assert manager.register(proxy)
            proxies.append(proxy)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert manager.num_available() == REGISTERED
    assert used / REGISTERED < BYTES_PER_CLIENT, f"{used / REGISTERED:.0f} bytes per client"


def test_contexts_hold_flowers_node_config_and_keep_only_state_that_exists() -> None:
    """A node's context has node_config {"partition-id": "i", "num-partitions": "n"} (str,
    as in Flower 1.12); state written by the client persists, and a node whose state stays
    empty gets an equal fresh context next time (nothing kept for it)."""
    seen: list[Context] = []

    def client_fn(context: Context) -> Client:
        seen.append(context)
        return Adder(context, keep=context.node_id == 1).to_client()

    backend = SequentialBackend()
    idle, busy = list(virtual_clients(2, client_fn=client_fn, backend=backend))
    ins = FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), {})
    for _ in range(2):
        for proxy in (idle, busy):
            proxy.fit(ins, timeout=10.0)
    first_idle, first_busy, second_idle, second_busy = seen
    assert first_idle.node_config == {"partition-id": "0", "num-partitions": "2"}
    assert type(first_idle.node_config) is dict
    assert second_idle.node_config == first_idle.node_config
    assert second_idle is not first_idle and len(second_idle.state.metrics_records) == 0
    assert second_busy is first_busy
    assert dict(second_busy.state.metrics_records["seen"]) == {"fits": 1}
