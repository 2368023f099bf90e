"""The real clock (see :class:`stamen.protocol.clock.Clock`)."""

from __future__ import annotations

import time

__all__ = ["SystemClock"]


class SystemClock:
    """:class:`~stamen.protocol.clock.Clock` backed by ``time.monotonic``/``time.sleep``."""

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` (nothing for zero or less)."""
        if seconds > 0:
            time.sleep(seconds)
