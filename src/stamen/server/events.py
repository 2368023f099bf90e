"""What happens in a run, as data: the one seam for progress output, dashboards and sinks.

The server publishes an event at each step of a run (nodes coming and going, waiting for
clients, each round's start, each reply, each round's end, the run's end) on a
:class:`RunEvents` bus; whatever shows or records the run subscribes to it: the progress
log, a live view, a dashboard, a metrics writer. Events are frozen dataclasses; a
subscriber that raises is logged and dropped from nothing else (the run goes on).

Subscribers are called on the thread that publishes (the round loop, or the fleet's event
loop for node events): they must be quick and must not block.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..typing import Scalar

__all__ = [
    "NodeJoined",
    "NodeLeft",
    "ReplyArrived",
    "ResultRefused",
    "RoundEnded",
    "RoundStarted",
    "RunEnded",
    "RunEvent",
    "RunEvents",
    "RunStarted",
    "WaitingForClients",
]

logger = logging.getLogger("stamen.server")


@dataclass(frozen=True, slots=True)
class RunStarted:
    """The run begins: ``num_rounds`` rounds of ``strategy``."""

    num_rounds: int
    strategy: str
    first_round: int = 1
    """1, or the round after the checkpoint the run resumed from."""


@dataclass(frozen=True, slots=True)
class WaitingForClients:
    """The server waits for ``needed`` nodes; ``connected`` are there."""

    connected: int
    needed: int


@dataclass(frozen=True, slots=True)
class NodeJoined:
    """A node connected."""

    cid: str
    transport: str
    peer: str


@dataclass(frozen=True, slots=True)
class NodeLeft:
    """A node went away; ``reason`` says why (None: it said goodbye)."""

    cid: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class RoundStarted:
    """Round ``server_round``'s ``phase`` ("fit" or "evaluate") sent ``sampled``
    instructions."""

    server_round: int
    phase: str
    sampled: int


@dataclass(frozen=True, slots=True)
class ReplyArrived:
    """One node's answer in a round: a result, or a failure with its reason."""

    server_round: int
    phase: str
    cid: str
    ok: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ResultRefused:
    """The strategy refused node ``cid``'s fit result of round ``server_round``
    (NaN/Inf, wrong shapes, no examples: ``reason``); a Stamen node is told so with the
    server's next message to it."""

    server_round: int
    cid: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoundEnded:
    """Round ``server_round``'s ``phase`` ended after ``seconds``.

    ``aggregated`` is False when nothing could be aggregated (``reasons`` say why).
    """

    server_round: int
    phase: str
    results: int
    failures: int
    seconds: float
    aggregated: bool = True
    loss: float | None = None
    metrics: dict[str, Scalar] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunEnded:
    """The run ended: completed (``ok``), or failed with ``reason``."""

    ok: bool
    rounds: int
    seconds: float
    reason: str | None = None


RunEvent = (
    RunStarted
    | WaitingForClients
    | NodeJoined
    | NodeLeft
    | RoundStarted
    | ReplyArrived
    | ResultRefused
    | RoundEnded
    | RunEnded
)
Subscriber = Callable[[RunEvent], None]


class RunEvents:
    """The bus a server publishes its run's events on (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every event from now on; returns the unsubscribe."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def publish(self, event: RunEvent) -> None:
        """Hand ``event`` to every subscriber; one that raises is logged, never fatal."""
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # a view must not end a run
                logger.exception("run event subscriber %r failed on %r", subscriber, event)
