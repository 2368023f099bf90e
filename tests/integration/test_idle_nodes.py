"""Waiting nodes sleep: a node blocked on its connection does not wake up to poll.

gRPC's synchronous API waits in slices of 0.1 s, so each waiting node thread woke ten
times a second; a thousand of them in one process spent their CPU in the kernel. The
gRPC transports now wait on a future of the process's client event loop. The test counts
the voluntary context switches of each node's thread (Linux's per-thread counter) while
the nodes wait for an instruction that does not come.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from stamen.messages import ReconnectIns
from stamen.server.client_manager import SimpleClientManager
from stamen.testing import NodeThread, node_threads, running_server
from stamen.testing.conformance import TRANSPORTS, AddClient

WAIT = 30.0
SETTLE = 0.5  # seconds for the nodes to reach their wait after registering
WINDOW = 2.0  # seconds of waiting measured: a thread polling every 0.1 s switches ~20 times
NODES = 3


def _switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in {status!r}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_node_waiting_for_an_instruction_does_not_wake_up(transport: str) -> None:
    manager = SimpleClientManager(wait_timeout=WAIT)
    with (
        running_server(client_manager=manager, run=False, rest=True) as srv,
        node_threads() as nodes,
    ):
        for k in range(NODES):
            node = NodeThread(
                {
                    "server_address": srv.address_for(transport),
                    "transport": transport,
                    "client": AddClient(k).to_client(),
                }
            ).start()
            nodes.append(node)
        assert manager.wait_for(NODES, timeout=WAIT)
        threads = [node.thread for node in nodes if node.thread is not None]
        pause = threading.Event()  # measurement windows, not synchronization
        pause.wait(SETTLE)
        before = [_switches(t) for t in threads]
        pause.wait(WINDOW)
        after = [_switches(t) for t in threads]
        for proxy in manager.all().values():
            proxy.reconnect(ReconnectIns(0), timeout=WAIT)
        outcomes = [node.join(WAIT) for node in nodes]
    woke = [b - a for a, b in zip(before, after, strict=True)]
    assert all(w <= 4 for w in woke), f"context switches per node in {WINDOW} s: {woke}"
    assert outcomes == [None] * NODES
