"""The budget of request bytes the fleet server holds before it can check them (sans-IO).

Every listener counts into one :class:`ByteBudget` (``Fleet.unverified``): REST the
bytes of each body as they arrive, gRPC the size bound of each call's method while its
message is received (the bytes are not visible before gRPC has the whole message), then,
on both, the request's own size until it is answered. A request that would go over is
refused; the listener says so in a WARNING at most once per :data:`WARN_EVERY` seconds.
"""

from __future__ import annotations

import math

__all__ = ["WARN_EVERY", "ByteBudget"]

WARN_EVERY = 10.0
"""Seconds between two WARNINGs of refusals (the others are counted)."""


class ByteBudget:
    """Bytes held at once, at most ``limit``.

    Args:
        limit: The most bytes held at once.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit: expected a positive number of bytes, received {limit!r}")
        self.limit = limit
        self.held = 0
        self.refused = 0
        """Requests refused so far."""
        self._warned = -math.inf

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (counted as a refusal) if that goes over."""
        if self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        """``size`` bytes taken earlier are no longer held."""
        self.held -= size
        if self.held < 0:
            raise ValueError(f"gave back {-self.held} bytes more than were taken")

    def should_warn(self, now: float) -> bool:
        """Whether a refusal at ``now`` (seconds, monotonic) is to be logged."""
        if now - self._warned < WARN_EVERY:
            return False
        self._warned = now
        return True
