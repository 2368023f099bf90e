"""A fake clock: time moves only when someone sleeps on it."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~stamen.protocol.clock.Clock` whose ``sleep`` advances time instantly.

    Attributes:
        sleeps: Every duration passed to :meth:`sleep`, in order.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        """The fake current time."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Record ``seconds`` and advance time by it."""
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        """Move time forward without recording a sleep."""
        self.now += seconds
