"""The client node's session state machine (sans-IO).

The driver (``stamen.client.app``) performs the I/O and reports what happened as events;
this machine checks that the event is legal in the current state and says what comes next.
All transitions are in one table, ``_TRANSITIONS``::

    DISCONNECTED --connect--> CONNECTING --connected--> CONNECTED
    CONNECTED --instruction--> HANDLING --replied--> CONNECTED
    HANDLING --reconnect(0)--> DONE          HANDLING --reconnect(n>0)--> DISCONNECTED
    CONNECTING/CONNECTED/HANDLING --link_failed--> BACKING_OFF --connect--> CONNECTING
    BACKING_OFF --give_up--> FAILED          any live state --fatal--> FAILED

Backoff state (attempts and outage start) is reset only when an instruction arrives, i.e.
when the session has proven to work, so a server that accepts connections but breaks every
stream still exhausts ``max_retries``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from ..errors import ProtocolError
from .retry import Backoff, RetryPolicy

__all__ = ["Event", "NodeSession", "State"]


class State(Enum):
    """Where a node's session is."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    HANDLING = "handling"
    BACKING_OFF = "backing_off"
    DONE = "done"
    FAILED = "failed"


class Event(Enum):
    """What the driver reports."""

    CONNECT = "connect"
    CONNECTED = "connected"
    INSTRUCTION = "instruction"
    REPLIED = "replied"
    RECONNECT_LATER = "reconnect_later"
    SHUTDOWN = "shutdown"
    LINK_FAILED = "link_failed"
    GIVE_UP = "give_up"
    FATAL = "fatal"


_S, _E = State, Event
_LIVE = (_S.CONNECTING, _S.CONNECTED, _S.HANDLING)
_TRANSITIONS: dict[tuple[State, Event], State] = {
    (_S.DISCONNECTED, _E.CONNECT): _S.CONNECTING,
    (_S.BACKING_OFF, _E.CONNECT): _S.CONNECTING,
    (_S.CONNECTING, _E.CONNECTED): _S.CONNECTED,
    (_S.CONNECTED, _E.INSTRUCTION): _S.HANDLING,
    (_S.HANDLING, _E.REPLIED): _S.CONNECTED,
    (_S.HANDLING, _E.RECONNECT_LATER): _S.DISCONNECTED,
    (_S.HANDLING, _E.SHUTDOWN): _S.DONE,
    (_S.BACKING_OFF, _E.GIVE_UP): _S.FAILED,
    **{(state, _E.LINK_FAILED): _S.BACKING_OFF for state in _LIVE},
    **{(state, _E.FATAL): _S.FAILED for state in (*_LIVE, _S.DISCONNECTED, _S.BACKING_OFF)},
}


class NodeSession:
    """Tracks one node's session and its reconnection budget."""

    def __init__(self, policy: RetryPolicy, rng: Callable[[], float]) -> None:
        self._policy = policy
        self._rng = rng
        self._state = State.DISCONNECTED
        self._backoff: Backoff | None = None

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    def _fire(self, event: Event) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, event)]
        except KeyError:
            raise ProtocolError(
                f"session: event {event.value!r} is not allowed in state {self._state.value!r}"
            ) from None

    def connect(self) -> None:
        """An attempt to connect starts."""
        self._fire(Event.CONNECT)

    def connected(self) -> None:
        """The transport is up."""
        self._fire(Event.CONNECTED)

    def instruction(self) -> None:
        """An instruction arrived: the session works, so the outage (if any) is over."""
        self._fire(Event.INSTRUCTION)
        self._backoff = None

    def replied(self) -> None:
        """The reply to the current instruction was handed to the transport."""
        self._fire(Event.REPLIED)

    def reconnect(self, seconds: int | None) -> bool:
        """The server asked us to leave; return True if we are to come back later."""
        come_back = bool(seconds)
        self._fire(Event.RECONNECT_LATER if come_back else Event.SHUTDOWN)
        return come_back

    def link_failed(self, now: float) -> float | None:
        """The link failed at ``now``; return the wait before retrying, or None to give up."""
        self._fire(Event.LINK_FAILED)
        if self._backoff is None:
            self._backoff = self._policy.start(now, self._rng)
        delay = self._backoff.next_delay(now)
        if delay is None:
            self._fire(Event.GIVE_UP)
        return delay

    @property
    def failures(self) -> int:
        """Failed attempts in the current outage (0 when connected)."""
        return 0 if self._backoff is None else self._backoff.failures

    def outage_seconds(self, now: float) -> float:
        """Seconds since the current outage began (0 when there is none)."""
        return 0.0 if self._backoff is None else self._backoff.elapsed(now)

    def fatal(self) -> None:
        """An error that retrying cannot fix."""
        self._fire(Event.FATAL)
