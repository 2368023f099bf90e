"""Client nodes in background threads, for tests."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..client.app import make_node_config, run_node, start_client
from ..clock import SystemClock
from ..errors import Timeout
from ..transport import TransportFactory

__all__ = ["NodeThread", "node_threads"]


@dataclass
class NodeThread:
    """A ``start_client`` call running in a thread, and its outcome.

    With ``transport_factory``, the node runs as ``start_client(**kwargs)`` would, but
    over the transport that factory builds (registered or not).
    """

    kwargs: dict[str, Any]
    thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    transport_factory: TransportFactory | None = None

    def start(self) -> NodeThread:
        """Start the node."""

        def target() -> None:
            try:
                if self.transport_factory is None:
                    start_client(**self.kwargs)
                else:
                    config = make_node_config(
                        **self.kwargs, transport_factory=self.transport_factory
                    )
                    run_node(config, clock=SystemClock(), rng=random.random)
            except BaseException as exc:  # kept for the test: see outcome
                self.errors.append(exc)
            finally:
                self.done.set()

        self.thread = threading.Thread(target=target, name="stamen-test-node", daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> BaseException | None:
        """Wait for the node to end; return what start_client raised (None: it returned).

        Raises:
            Timeout: the node is still running after ``timeout`` seconds.
        """
        if not self.done.wait(timeout):
            raise Timeout(f"client node still running after {timeout:g} s")
        return self.errors[0] if self.errors else None


@contextmanager
def node_threads(join_timeout: float = 30.0) -> Iterator[list[NodeThread]]:
    """Collect NodeThreads (append started ones); on exit, wait for all of them.

    Raises:
        Timeout: on exit, when a node did not end within ``join_timeout`` seconds.
    """
    nodes: list[NodeThread] = []
    try:
        yield nodes
    finally:
        stuck = [n for n in nodes if not n.done.wait(join_timeout)]
        if stuck:
            raise Timeout(f"{len(stuck)} client node(s) still running after {join_timeout:g} s")
