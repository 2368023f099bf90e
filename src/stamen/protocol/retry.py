"""Reconnection policy: exponential backoff with full jitter, bounded by count and time.

Sans-IO: the policy decides *how long* to wait and *whether* to go on; the caller sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["Backoff", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to give up reconnecting, and how long to wait between attempts.

    Attributes:
        max_retries: Consecutive failed attempts allowed after the first; ``None`` is no
            limit. ``max_retries=2`` makes at most 3 attempts.
        max_wait_time: Seconds allowed since the connection was lost (or since the first
            attempt); ``None`` is no limit.
        base_delay: Upper bound of the first wait; doubles with each failure.
        max_delay: Cap of the wait's upper bound.
    """

    max_retries: int | None = None
    max_wait_time: float | None = None
    base_delay: float = 1.0
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.max_retries is not None and (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ConfigError(
                f"max_retries: expected None or an int >= 0, received {self.max_retries!r}"
            )
        if self.max_wait_time is not None and (
            isinstance(self.max_wait_time, bool)
            or not isinstance(self.max_wait_time, int | float)
            or not self.max_wait_time >= 0
        ):
            raise ConfigError(
                f"max_wait_time: expected None or a number >= 0, received {self.max_wait_time!r}"
            )
        if not 0 < self.base_delay <= self.max_delay:
            raise ConfigError(
                f"base_delay/max_delay: expected 0 < base_delay <= max_delay, received "
                f"{self.base_delay}/{self.max_delay}"
            )

    def start(self, now: float, rng: Callable[[], float]) -> Backoff:
        """Begin one outage at time ``now``; ``rng`` returns uniform floats in [0, 1)."""
        return Backoff(self, now, rng)


class Backoff:
    """The state of one outage: failed attempts so far and when it began."""

    __slots__ = ("_failures", "_policy", "_rng", "_started")

    def __init__(self, policy: RetryPolicy, now: float, rng: Callable[[], float]) -> None:
        self._policy = policy
        self._started = now
        self._rng = rng
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failed attempts recorded in this outage."""
        return self._failures

    def elapsed(self, now: float) -> float:
        """Seconds since the outage began."""
        return now - self._started

    def next_delay(self, now: float) -> float | None:
        """Record a failed attempt; return the wait before the next one, or ``None`` to give up.

        The wait is uniform in ``[0, min(max_delay, base_delay * 2**(failures-1))]``
        ("full jitter"), shortened so the next attempt falls inside ``max_wait_time``.
        """
        self._failures += 1
        policy = self._policy
        if policy.max_retries is not None and self._failures > policy.max_retries:
            return None
        ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** min(self._failures - 1, 62))
        delay = self._rng() * ceiling
        if policy.max_wait_time is not None:
            remaining = policy.max_wait_time - self.elapsed(now)
            if remaining <= 0:
                return None
            delay = min(delay, remaining)
        return delay
