"""The dashboard's own model of a run: run events in, JSON-ready snapshots out.

:class:`DashboardState` subscribes to a server's :class:`~stamen.server.events.RunEvents`
and keeps a small summary of the run: its course (round k of N, the phase under way,
results arrived against instructions sent, failures with their reasons), the nodes
(id, transport, peer address, when they connected, when they were last heard from) and
one row per round (results, failures, seconds, loss, numeric metrics).

Events come from two threads (the round loop and the fleet's event loop); the state is
guarded by one lock, held only to update or copy a few dicts, so a subscriber call is
quick and never blocks on the web server. Readers (the web server's thread) take
:meth:`~DashboardState.snapshot` and :meth:`~DashboardState.history`, plain dicts made
under the lock.

Only what may be shown is kept: ids, transports, peer addresses, timings, counts,
losses and numeric metrics, and failure reasons cut to :data:`MAX_REASON` characters.
Parameters, keys and the rest of what a node sends never reach an event, so never reach
this state; non-numeric metrics (strings, bytes) are left out too. Memory is bounded:
at most :data:`MAX_NODES` nodes are remembered (nodes that left are forgotten first),
:data:`MAX_FAILURES` failures per round phase and :data:`MAX_ROUNDS` rounds.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..events import (
    NodeJoined,
    NodeLeft,
    ReplyArrived,
    RoundEnded,
    RoundStarted,
    RunEnded,
    RunEvent,
    RunStarted,
    WaitingForClients,
)

__all__ = ["MAX_FAILURES", "MAX_NODES", "MAX_REASON", "MAX_ROUNDS", "DashboardState"]

MAX_NODES = 2000
"""Nodes remembered (connected first); a larger federation is shown as counts."""
MAX_LEFT_NODES = 200
"""Nodes that left, remembered (the newest), within :data:`MAX_NODES`."""
MAX_FAILURES = 100
"""Failures kept per round and phase (the count is always exact)."""
MAX_ROUNDS = 10_000
"""Rounds kept in the history (the newest)."""
MAX_REASON = 300
"""Characters of a failure reason kept."""
MAX_METRICS = 32
"""Metrics kept per round and phase (numeric ones, by name)."""


def _reason(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def _number(value: object) -> float | int | None:
    """A JSON number for a metric value, or None (not numeric, or not finite)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def _metrics(values: Mapping[str, object]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for name in sorted(values)[:MAX_METRICS]:
        number = _number(values[name])
        if number is not None:
            out[str(name)[:64]] = number
    return out


@dataclass
class _Node:
    cid: str
    transport: str
    peer: str
    connected_since: float
    last_heard: float
    connected: bool = True
    left_at: float | None = None
    left_reason: str | None = None
    last_round: int | None = None  # of its last reply
    failed_round: int | None = None  # of its last failure
    last_failure: str | None = None
    failures: int = 0

    def json(self) -> dict[str, Any]:
        return {
            "id": self.cid,
            "transport": self.transport,
            "peer": self.peer,
            "connected_since": self.connected_since,
            "last_heard": self.last_heard,
            "status": "connected" if self.connected else "left",
            "left_at": self.left_at,
            "left_reason": self.left_reason,
            "last_round": self.last_round,
            "failed_round": self.failed_round,
            # "failed" when a reply of the last round it took part in failed
            "outcome": (
                None
                if self.last_round is None
                else "failed"
                if self.failed_round == self.last_round
                else "ok"
            ),
            "last_failure": self.last_failure,
            "failures": self.failures,
        }


@dataclass
class _Phase:
    """One round's phase as it goes: instructions sent, replies, failures."""

    server_round: int
    phase: str
    sampled: int
    started_at: float
    results: int = 0
    failures: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    ended: dict[str, Any] | None = None

    def json(self) -> dict[str, Any]:
        return {
            "round": self.server_round,
            "phase": self.phase,
            "expected": self.sampled,
            "results": self.results,
            "failures": self.failures,
            "failed": list(self.failed),
            "started_at": self.started_at,
            "ended": None if self.ended is None else dict(self.ended),
        }


class DashboardState:
    """A run's summary for the dashboard, fed by run events (see the module docstring).

    Args:
        clock: Wall-clock seconds (``time.time``); events carry no time of their own, so
            each is stamped when it arrives.

    Call it with each event (it is a :class:`~stamen.server.events.RunEvents`
    subscriber). ``version`` grows with every change, ``history_version`` with every
    change of the per-round history; :meth:`watch` tells a reader of each change.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: tuple[Callable[[], None], ...] = ()
        self._snapshot: dict[str, Any] | None = None
        self.version = 0
        self.history_version = 0
        self._run: dict[str, Any] = {
            "status": "starting",
            "strategy": None,
            "num_rounds": None,
            "first_round": None,
            "started_at": None,
            "ended_at": None,
            "seconds": None,
            "reason": None,
        }
        self._waiting: dict[str, int] | None = None
        self._nodes: OrderedDict[str, _Node] = OrderedDict()
        self._left: OrderedDict[str, None] = OrderedDict()  # cids of nodes that left, oldest first
        self._joined_total = 0
        self._left_total = 0
        self._current: _Phase | None = None
        self._last_round = 0  # highest round that ended (fit or evaluate)
        self._rounds: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._total_failures = 0

    # --- events in -----------------------------------------------------------------------

    def __call__(self, event: RunEvent) -> None:
        """Take one run event (called on the publishing thread; quick, never blocks)."""
        now = self._clock()
        with self._lock:
            history = self._apply(event, now)
            self.version += 1
            if history:
                self.history_version += 1
            listeners = self._listeners
        for listener in listeners:
            listener()

    def _apply(self, event: RunEvent, now: float) -> bool:
        """Update the model; True when the per-round history changed."""
        if isinstance(event, RunStarted):
            self._run.update(
                status="running",
                strategy=event.strategy,
                num_rounds=event.num_rounds,
                first_round=event.first_round,
                started_at=now,
                ended_at=None,
                seconds=None,
                reason=None,
            )
            self._waiting = None
        elif isinstance(event, WaitingForClients):
            self._waiting = {"connected": event.connected, "needed": event.needed}
            if self._run["status"] == "starting":
                self._run["status"] = "waiting"
        elif isinstance(event, NodeJoined):
            self._joined(event, now)
        elif isinstance(event, NodeLeft):
            self._node_left(event, now)
        elif isinstance(event, RoundStarted):
            self._waiting = None
            self._current = _Phase(event.server_round, event.phase, event.sampled, now)
        elif isinstance(event, ReplyArrived):
            self._reply(event, now)
        elif isinstance(event, RoundEnded):
            self._round_ended(event, now)
            return True
        elif isinstance(event, RunEnded):
            self._run.update(
                status="completed" if event.ok else "failed",
                ended_at=now,
                seconds=event.seconds,
                reason=_reason(event.reason),
            )
        return False

    def _joined(self, event: NodeJoined, now: float) -> None:
        self._joined_total += 1
        self._left.pop(event.cid, None)
        self._nodes.pop(event.cid, None)
        self._nodes[event.cid] = _Node(event.cid, event.transport, event.peer, now, now)
        while len(self._nodes) > MAX_NODES:
            oldest = next(iter(self._left), None)
            if oldest is None:  # all connected: forget the longest-connected
                self._nodes.popitem(last=False)
            else:
                del self._left[oldest]
                self._nodes.pop(oldest, None)

    def _node_left(self, event: NodeLeft, now: float) -> None:
        node = self._nodes.get(event.cid)
        if node is None or not node.connected:
            return
        self._left_total += 1
        node.connected = False
        node.left_at = now
        node.left_reason = _reason(event.reason) or "said goodbye"
        self._left[event.cid] = None
        while len(self._left) > MAX_LEFT_NODES:
            oldest, _ = self._left.popitem(last=False)
            self._nodes.pop(oldest, None)

    def _reply(self, event: ReplyArrived, now: float) -> None:
        node = self._nodes.get(event.cid)
        if node is not None:
            node.last_heard = now
            node.last_round = event.server_round
            if not event.ok:
                node.failures += 1
                node.failed_round = event.server_round
                node.last_failure = _reason(event.reason)
        current = self._current
        if (
            current is None
            or current.server_round != event.server_round
            or current.phase != event.phase
        ):
            return
        if event.ok:
            current.results += 1
            return
        current.failures += 1
        self._total_failures += 1
        if len(current.failed) < MAX_FAILURES:
            current.failed.append({"id": event.cid, "reason": _reason(event.reason)})

    def _round_ended(self, event: RoundEnded, now: float) -> None:
        ended = {
            "results": event.results,
            "failures": event.failures,
            "seconds": event.seconds,
            "aggregated": event.aggregated,
            "loss": _number(event.loss),
            "metrics": _metrics(event.metrics),
            "reasons": [_reason(r) for r in event.reasons[:MAX_FAILURES]],
        }
        current = self._current
        if (
            current is not None
            and current.server_round == event.server_round
            and current.phase == event.phase
        ):
            current.ended = ended
            failed = list(current.failed)
        else:
            failed = []
        self._last_round = max(self._last_round, event.server_round)
        row = self._rounds.get(event.server_round)
        if row is None:
            row = {"round": event.server_round, "fit": None, "evaluate": None, "ended_at": now}
            self._rounds[event.server_round] = row
        row[event.phase] = {**ended, "failed": failed}
        row["ended_at"] = now
        while len(self._rounds) > MAX_ROUNDS:
            self._rounds.popitem(last=False)

    # --- snapshots out -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The run's state now, as JSON-ready data (``GET /api/state``).

        Made once per version (the lock is held only to copy the model) and shared by
        every reader until the next change; only ``now`` is fresh on each call. Readers
        must not modify it.
        """
        with self._lock:
            cached = self._snapshot
            if cached is None or cached["version"] != self.version:
                cached = self._snapshot = self._make_snapshot()
        return {**cached, "now": self._clock()}

    def _make_snapshot(self) -> dict[str, Any]:
        nodes = [n.json() for n in self._nodes.values()]
        connected = sum(1 for n in self._nodes.values() if n.connected)
        nodes.sort(key=lambda n: (n["status"] != "connected", n["id"]))
        return {
            "version": self.version,
            "history_version": self.history_version,
            "now": 0.0,
            "run": dict(self._run),
            "waiting": None if self._waiting is None else dict(self._waiting),
            "round": None if self._current is None else self._current.json(),
            "rounds_done": self._last_round,
            "failures_total": self._total_failures,
            "nodes": {
                "connected": connected,
                "joined_total": self._joined_total,
                "left_total": self._left_total,
                "shown": len(nodes),
                "list": nodes,
            },
        }

    def history(self) -> dict[str, Any]:
        """One row per round that ended (``GET /api/history``): each phase's results,
        failures, seconds, loss and numeric metrics."""
        with self._lock:
            rows = []
            for row in self._rounds.values():
                copied = dict(row)
                for phase in ("fit", "evaluate"):
                    if copied[phase] is not None:
                        copied[phase] = {
                            **copied[phase],
                            "metrics": dict(copied[phase]["metrics"]),
                            "failed": list(copied[phase]["failed"]),
                        }
                rows.append(copied)
            return {"history_version": self.history_version, "rounds": rows}

    def watch(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every change (on the publishing thread: it must be
        quick, e.g. wake a reader on another loop); returns the unwatch."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def unwatch() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unwatch
