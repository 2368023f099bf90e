"""A live view of a run on a terminal, drawn with ``rich`` (``pip install 'stamen[rich]'``).

:class:`LiveView` subscribes to the run's events (:mod:`stamen.server.events`) and keeps
one panel up to date: round k/N and its phase, a bar of the replies arrived against those
expected, connected nodes, elapsed time and an ETA, and the latest loss and metrics.
``stamen server`` and ``start_server`` show it when stderr is a terminal, ``rich`` is
installed and the program set up no logging (:func:`stamen.server.progress.shown_run`);
pass one to ``start_server(subscribers=[LiveView()])`` to have it whatever the logging.
Log records still print above the panel when logged through :meth:`LiveView.log_handler`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..errors import ConfigError
from .events import (
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

__all__ = ["LiveView", "rich_available"]


def rich_available() -> bool:
    """Whether ``rich`` can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes = f"{rest // 60:02d}:{rest % 60:02d}"
    return f"{hours}:{minutes}" if hours else minutes


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LiveView:
    """The live panel of one run (see the module docstring).

    Args:
        console: A ``rich.console.Console`` (default: one on stderr).
        refresh_per_second: How often the panel is redrawn.
        title: The panel's title.
    """

    def __init__(
        self, console: Any = None, refresh_per_second: float = 4.0, title: str = "Stamen server"
    ) -> None:
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError as exc:
            raise ConfigError(
                f"the live view needs rich: pip install 'stamen[rich]': {exc}"
            ) from exc
        self.console: Any = console if console is not None else Console(stderr=True)
        self._title = title
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._strategy = ""
        self._num_rounds = 0
        self._first_round = 1
        self._round = 0
        self._phase = "waiting"
        self._expected = 0
        self._arrived = 0
        self._failed = 0
        self._connected = 0
        self._needed: int | None = None
        self._rounds_done = 0
        self._round_seconds = 0.0
        self._latest: dict[str, str] = {}
        self._latest_round = 0
        self._outcome: str | None = None
        self._running = False
        self._live: Any = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=refresh_per_second,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def log_handler(self, level: int = logging.WARNING) -> logging.Handler:
        """A logging handler that prints records above the panel."""
        from rich.logging import RichHandler

        handler = RichHandler(console=self.console, show_path=False, level=level)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        return handler

    def start(self) -> None:
        """Show the panel (done by the first event, too)."""
        with self._lock:
            if self._running:
                return
            self._running = True
        self._live.start()

    def stop(self) -> None:
        """Draw the panel a last time and leave it on the terminal."""
        with self._lock:
            if not self._running:
                return
            self._running = False
        self._live.refresh()
        self._live.stop()

    def __call__(self, event: RunEvent) -> None:
        """Update the panel's state from ``event``."""
        with self._lock:
            self._update(event)
        if isinstance(event, RunEnded):
            self.stop()
        else:
            self.start()

    def _update(self, event: RunEvent) -> None:
        if isinstance(event, RunStarted):
            self._strategy = event.strategy
            self._num_rounds = event.num_rounds
            self._first_round = event.first_round
            self._phase = "started"
        elif isinstance(event, WaitingForClients):
            self._connected = event.connected
            self._needed = event.needed
        elif isinstance(event, NodeJoined):
            self._connected += 1
        elif isinstance(event, NodeLeft):
            self._connected = max(0, self._connected - 1)
        elif isinstance(event, RoundStarted):
            self._round = event.server_round
            self._phase = event.phase
            self._expected = event.sampled
            self._arrived = self._failed = 0
        elif isinstance(event, ReplyArrived):
            if event.server_round == self._round and event.phase == self._phase:
                self._arrived += 1
                self._failed += 0 if event.ok else 1
        elif isinstance(event, RoundEnded):
            if event.phase == "evaluate" or event.server_round > self._rounds_done:
                self._rounds_done = max(self._rounds_done, event.server_round)
            self._round_seconds = time.monotonic() - self._started
            values = dict(event.metrics)
            if event.loss is not None:
                values = {"loss": event.loss, **values}
            if values:
                self._latest = {f"{event.phase}/{k}": _value(v) for k, v in values.items()}
                self._latest_round = event.server_round
        elif isinstance(event, RunEnded):
            self._outcome = (
                f"run completed: {event.rounds} round(s) in {event.seconds:.1f} s"
                if event.ok
                else f"run failed: {event.reason}"
            )

    def _eta(self, elapsed: float) -> str:
        done = self._rounds_done - self._first_round + 1
        left = self._num_rounds - self._rounds_done
        if done <= 0 or left <= 0:
            return "-"
        return _clock(self._round_seconds / done * left)

    def _render(self) -> Any:
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        with self._lock:
            elapsed = time.monotonic() - self._started
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            rounds = f"{self._round}/{self._num_rounds}" if self._num_rounds else "-"
            grid.add_row("round", f"{rounds}  {self._phase}  ({self._strategy or '...'})")
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                ProgressBar(total=max(self._expected, 1), completed=self._arrived, width=30),
                f"{self._arrived}/{self._expected} replies"
                + (f", {self._failed} failed" if self._failed else ""),
            )
            grid.add_row("replies", bar)
            needed = f" (waiting for {self._needed})" if self._needed and self._round == 0 else ""
            grid.add_row("nodes", f"{self._connected} connected{needed}")
            grid.add_row("time", f"elapsed {_clock(elapsed)}  ETA {self._eta(elapsed)}")
            latest = "  ".join(f"{k}={v}" for k, v in sorted(self._latest.items()))
            grid.add_row("latest", f"round {self._latest_round}: {latest}" if latest else "-")
            if self._outcome is not None:
                grid.add_row("outcome", self._outcome)
            return Panel(grid, title=self._title, expand=False)
