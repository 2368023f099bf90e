"""Fixtures for tests that run real servers and client nodes on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import stamen as fl


@dataclass
class NodeThread:
    """A ``start_client`` call running in a thread, with its outcome."""

    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def join(self, timeout: float) -> None:
        """Wait for the node to end; fail the test if it does not within ``timeout``."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"client node still running after {timeout} s"

    @property
    def outcome(self) -> BaseException | None:
        """The exception start_client raised, or None if it returned normally."""
        assert self.done.is_set(), "client node has not finished"
        return self.error[0] if self.error else None


@pytest.fixture
def start_node() -> Iterator[Callable[..., NodeThread]]:
    """Start ``stamen.client.start_client(**kwargs)`` in threads; all joined at teardown."""
    nodes: list[NodeThread] = []

    def start(**kwargs: Any) -> NodeThread:
        node = NodeThread(thread=threading.Thread(target=lambda: None))

        def target() -> None:
            try:
                fl.client.start_client(**kwargs)
            except BaseException as exc:  # handed to the test through NodeThread.outcome
                node.error.append(exc)
            finally:
                node.done.set()

        node.thread = threading.Thread(target=target, daemon=True)
        node.thread.start()
        nodes.append(node)
        return node

    yield start
    alive = []
    for node in nodes:
        node.thread.join(30)
        if node.thread.is_alive():
            alive.append(node)
    assert not alive, f"{len(alive)} client node thread(s) still running at teardown"


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A 127.0.0.1 address where nothing listens (the port is held, so it stays dead)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
