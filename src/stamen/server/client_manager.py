"""``ClientManager``: the set of connected nodes, and sampling from it.

Every wait is bounded: where Flower waits up to 24 hours for enough clients, a
:class:`SimpleClientManager` waits ``wait_timeout`` seconds (default 600) and then raises
:class:`~stamen.errors.NotEnoughClients` naming how many it had and how many it needed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from ..errors import ConfigError, NotEnoughClients
from .client_proxy import ClientProxy
from .events import RunEvents, WaitingForClients

logger = logging.getLogger("stamen.server")

__all__ = ["ClientManager", "Criterion", "SimpleClientManager"]


class Criterion(ABC):
    """A filter on clients for :meth:`ClientManager.sample`."""

    @abstractmethod
    def select(self, client: ClientProxy) -> bool:
        """Return True to make ``client`` eligible."""


class ClientManager(ABC):
    """Tracks connected clients and samples them for rounds.

    Attributes:
        events: Where a wait for clients is reported (the server's run events, set by
            the Server that uses this manager); None: nowhere.
    """

    events: RunEvents | None = None

    @abstractmethod
    def num_available(self) -> int:
        """Number of connected clients."""

    @abstractmethod
    def register(self, client: ClientProxy) -> bool:
        """Add a client; False if its cid is already registered."""

    @abstractmethod
    def unregister(self, client: ClientProxy) -> None:
        """Remove a client (no error if absent)."""

    @abstractmethod
    def all(self) -> dict[str, ClientProxy]:
        """All connected clients by cid."""

    @abstractmethod
    def wait_for(self, num_clients: int, timeout: float) -> bool:
        """Wait until at least ``num_clients`` are connected; False on timeout."""

    @abstractmethod
    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        """Pick ``num_clients`` clients at random, after waiting for ``min_num_clients``."""


_WAIT_REPORT = 5.0
"""Seconds between the lines that say how many clients a wait still lacks."""


class SimpleClientManager(ClientManager):
    """Thread-safe client registry with bounded waits.

    Args:
        wait_timeout: Seconds :meth:`sample` waits for ``min_num_clients`` before raising
            :class:`~stamen.errors.NotEnoughClients`.
        seed: Seed of the sampling RNG (None: unpredictable).
    """

    def __init__(self, wait_timeout: float = 600.0, seed: int | None = None) -> None:
        if (
            isinstance(wait_timeout, bool)
            or not isinstance(wait_timeout, int | float)
            or not wait_timeout > 0
        ):
            raise ConfigError(f"wait_timeout: expected a number > 0, received {wait_timeout!r}")
        self.wait_timeout = float(wait_timeout)
        self._clients: dict[str, ClientProxy] = {}
        self._cv = threading.Condition()
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return self.num_available()

    def num_available(self) -> int:
        """Number of connected clients."""
        with self._cv:
            return len(self._clients)

    def register(self, client: ClientProxy) -> bool:
        """Add a client; False if its cid is already registered."""
        with self._cv:
            if client.cid in self._clients:
                return False
            self._clients[client.cid] = client
            self._cv.notify_all()
            return True

    def unregister(self, client: ClientProxy) -> None:
        """Remove a client (no error if absent)."""
        with self._cv:
            if self._clients.get(client.cid) is client:
                del self._clients[client.cid]
                self._cv.notify_all()

    def all(self) -> dict[str, ClientProxy]:
        """A snapshot of all connected clients by cid."""
        with self._cv:
            return dict(self._clients)

    def wait_for(self, num_clients: int, timeout: float | None = None) -> bool:
        """Wait until at least ``num_clients`` are connected (default bound: wait_timeout)."""
        bound = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound

        def enough() -> bool:
            return len(self._clients) >= num_clients

        with self._cv:
            while not self._cv.wait_for(enough, timeout=min(_WAIT_REPORT, bound)):
                bound = deadline - time.monotonic()
                if bound <= 0:
                    return False
                if self.events is not None:  # its progress log says it
                    self.events.publish(WaitingForClients(len(self._clients), num_clients))
                else:
                    logger.info(
                        "waiting for clients: %d/%d connected", len(self._clients), num_clients
                    )
            return True

    def wait_until(
        self, condition: Callable[[dict[str, ClientProxy]], bool], timeout: float
    ) -> bool:
        """Wait until ``condition(connected clients by cid)`` holds; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: condition(dict(self._clients)), timeout=timeout)

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        """Pick ``num_clients`` clients at random among those ``criterion`` accepts.

        Raises:
            NotEnoughClients: fewer than ``min_num_clients`` (default ``num_clients``)
                connected within ``wait_timeout`` seconds.
        """
        needed = num_clients if min_num_clients is None else min_num_clients
        if not self.wait_for(needed):
            raise NotEnoughClients(
                f"needed {needed} connected client(s), had {self.num_available()} after waiting "
                f"{self.wait_timeout:g} s (SimpleClientManager(wait_timeout=...))"
            )
        with self._cv:
            candidates = [
                c for c in self._clients.values() if criterion is None or criterion.select(c)
            ]
        if num_clients > len(candidates):
            return candidates if len(candidates) >= needed else []
        return self._rng.sample(candidates, num_clients)
