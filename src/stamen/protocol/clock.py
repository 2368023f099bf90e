"""The clock seam: time is injected, never read from a global.

The protocol core and the retry loop ask a :class:`Clock` for the time and for sleeps, so
tests drive them with a fake clock (``stamen.testing.FakeClock``) in microseconds of real
time. ``stamen.clock.SystemClock`` is the real one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Clock"]


@runtime_checkable
class Clock(Protocol):
    """Monotonic time and sleeping."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary, fixed origin; never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the caller for ``seconds``."""
        ...
