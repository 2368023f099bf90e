"""A run's progress as log lines: the default view of :mod:`stamen.server.events`.

:class:`ProgressLog` turns each event into one line on the ``stamen.server`` logger:
INFO for the run's and each round's course, WARNING for failures and for rounds that
aggregated nothing, DEBUG for single nodes coming and going (a federation may have
thousands). Where the lines go is the program's logging configuration;
:func:`shown_progress` shows them on stderr for the length of a run when the program
configured no logging at all (it lives in :mod:`stamen.logger`, shared with the client
and the simulation, and is re-exported here). Each line carries its event
(``record.event``), which :class:`stamen.logger.JsonFormatter` writes out as fields.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from ..logger import logging_configured, shown_progress
from .events import (
    NodeJoined,
    NodeLeft,
    ReplyArrived,
    RoundEnded,
    RoundStarted,
    RunEnded,
    RunEvent,
    RunEvents,
    RunStarted,
    WaitingForClients,
)

__all__ = ["ProgressLog", "shown_progress", "shown_run"]


def _scalars(values: dict[str, object]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items())
    )


class ProgressLog:
    """Logs each run event as one line (see the module docstring)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("stamen.server")
        self._num_rounds = 0

    def __call__(self, event: RunEvent) -> None:
        """Log ``event``."""
        log = logging.LoggerAdapter(self._log, {"event": event})
        if isinstance(event, RunStarted):
            self._num_rounds = event.num_rounds
            log.info("run started: %d round(s) of %s", event.num_rounds, event.strategy)
        elif isinstance(event, WaitingForClients):
            log.info("waiting for clients: %d/%d connected", event.connected, event.needed)
        elif isinstance(event, NodeJoined):
            log.debug("node %s connected over %s from %s", event.cid, event.transport, event.peer)
        elif isinstance(event, NodeLeft):
            log.debug("node %s left: %s", event.cid, event.reason or "said goodbye")
        elif isinstance(event, RoundStarted):
            log.info(
                "round %d/%d: %s sent to %d node(s)",
                event.server_round,
                self._num_rounds,
                event.phase,
                event.sampled,
            )
        elif isinstance(event, ReplyArrived):
            if not event.ok:
                log.warning(
                    "round %d: %s failed on node %s: %s",
                    event.server_round,
                    event.phase,
                    event.cid,
                    event.reason,
                )
        elif isinstance(event, RoundEnded):
            self._round_ended(event)
        elif isinstance(event, RunEnded):
            if event.ok:
                log.info("run completed: %d round(s) in %.2f s", event.rounds, event.seconds)
            else:
                log.error("run failed after %.2f s: %s", event.seconds, event.reason)

    def _round_ended(self, event: RoundEnded) -> None:
        log = logging.LoggerAdapter(self._log, {"event": event})
        if not event.aggregated:
            log.warning(
                "round %d: nothing aggregated%s: %s",
                event.server_round,
                "" if event.phase == "fit" else f" ({event.phase})",
                "; ".join(event.reasons) or "no results",
            )
            return
        outcome = f" loss={event.loss:.4g}" if event.loss is not None else ""
        if event.metrics:
            outcome += f" {_scalars(dict(event.metrics))}"
        log.info(
            "round %d/%d: %s done in %.2f s: %d result(s), %d failure(s)%s",
            event.server_round,
            self._num_rounds,
            event.phase,
            event.seconds,
            event.results,
            event.failures,
            outcome,
        )


def _not_in_the_panel(record: logging.LogRecord) -> bool:
    """The live view draws the run's events: their INFO lines are not printed too."""
    return record.levelno >= logging.WARNING or not hasattr(record, "event")


@contextlib.contextmanager
def shown_run(events: RunEvents) -> Iterator[None]:
    """:func:`shown_progress` for a server's run: on a terminal, with ``rich`` installed
    and no logging set up by the program, the run is drawn as a live panel
    (:class:`stamen.server.live.LiveView`) with warnings printed above it; elsewhere,
    plain INFO lines on stderr. Nothing stays installed after the block."""
    from .live import LiveView, rich_available

    if logging_configured() or not sys.stderr.isatty() or not rich_available():
        with shown_progress():
            yield
        return
    view = LiveView()
    handler = view.log_handler(logging.INFO)
    handler.addFilter(_not_in_the_panel)
    stamen = logging.getLogger("stamen")
    stamen.addHandler(handler)
    stamen.setLevel(logging.INFO)
    unsubscribe = events.subscribe(view)
    try:
        yield
    finally:
        unsubscribe()
        view.stop()
        stamen.removeHandler(handler)
        stamen.setLevel(logging.NOTSET)
