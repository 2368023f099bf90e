"""A node's side of the Fleet protocol (grpc-rere, rest), sans-IO.

:class:`FleetClientState` is what a node knows of its session with a Fleet server: its
id, the server's timing, the instruction being received (frame by frame) and the one
being answered. It builds each request and takes each response; the transport
(``stamen.transport.fleet``) only sends the requests and waits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

from ..errors import ConnectionLost, ProtocolError
from .fleet import (
    CreateNodeRequest,
    CreateNodeResponse,
    PullRequest,
    PullResponse,
    PushRequest,
    SimpleRequest,
)
from .fleet_server import Framing, Reader
from .mailbox import Payload

__all__ = ["MAX_POLL_TIMEOUT", "MIN_SERVER_MESSAGE_LENGTH", "SERVER_SECONDS", "FleetClientState"]

logger = logging.getLogger("stamen.client")

SERVER_SECONDS = (0.01, 3600.0)
"""The heartbeat intervals and long-poll timeouts a node accepts from a server."""

MAX_POLL_TIMEOUT = 300.0
"""The longest long-poll a node waits on (five minutes): a server's longer
``poll_timeout`` is clamped to it, with a warning, so a server that holds each poll
cannot keep a node waiting for an hour; the node gives up a pull after this plus 15 s
and reconnects (under ``max_retries``/``max_wait_time``)."""

MIN_SERVER_MESSAGE_LENGTH = 1024
"""The smallest message bound a node accepts from a server: a node frames its replies to
the server's bound, and a bound of a few hundred bytes would cut a model into frames of a
byte each (a node sending for ever)."""

_SLACK = 15.0
"""Seconds a pull may take beyond the server's long-poll timeout before the node gives up."""


def _seconds(name: str, value: float, default: float) -> float:
    """A timing value of a CreateNodeResponse: 0 (unset) means ``default``.

    Raises:
        ProtocolError: not a number of seconds in [0.01, 3600]. A NaN, infinite, negative,
            tiny or huge value would otherwise crash the node's HTTP or gRPC library, make
            it send heartbeats in a busy loop, or let a silent server hold a pull open for
            ever.
    """
    if value == 0:
        return default
    low, high = SERVER_SECONDS
    if not (math.isfinite(value) and low <= value <= high):
        raise ProtocolError(
            f"CreateNode: {name}: expected seconds in [{low:g}, {high:g}], received {value!r}"
        )
    return value


class FleetClientState:
    """One node's Fleet session (see the module docstring).

    Args:
        framing: How messages are cut into frames.
        max_message_length: The node's bound of one message, both ways.
        reader: Puts the server's frames together (None: ``framing.reader()``); the
            node's own, bounded by its ``max_model_bytes``.
    """

    def __init__(
        self, framing: Framing, max_message_length: int, reader: Reader | None = None
    ) -> None:
        self._framing = framing
        self.max_message_length = max_message_length
        self._frame_size = framing.frame_size(max_message_length)
        self.reply_frame_size = self._frame_size
        self._reader = framing.reader() if reader is None else reader
        self.node_id = 0
        self.poll_timeout = 10.0
        self.heartbeat_interval = 15.0
        self.task_id = 0
        """The instruction being answered (0: none)."""
        self._receiving = 0
        """The instruction whose frames are being received (0: none)."""
        self.busy = False
        """Between an instruction's first message and its reply: heartbeats are due."""

    @property
    def pull_timeout(self) -> float:
        """How long a pull may take before the node gives up on it."""
        return self.poll_timeout + _SLACK

    def create_request(self) -> CreateNodeRequest:
        """The registration request."""
        return CreateNodeRequest(max_message_length=self.max_message_length)

    def registered(self, response: CreateNodeResponse) -> None:
        """Take the server's answer to the registration.

        Raises:
            ProtocolError: no node id, or timing values no node should accept.
        """
        if response.node_id == 0:
            raise ProtocolError("CreateNode: expected a node id, received 0")
        self.node_id = response.node_id  # set first, so that the node unregisters it
        poll_timeout = _seconds("poll_timeout", response.poll_timeout, self.poll_timeout)
        if poll_timeout > MAX_POLL_TIMEOUT:
            logger.warning(
                "CreateNode: the server's poll_timeout of %g s is over the node's maximum; "
                "long-polling for %g s instead",
                poll_timeout,
                MAX_POLL_TIMEOUT,
            )
            poll_timeout = MAX_POLL_TIMEOUT
        self.poll_timeout = poll_timeout
        self.heartbeat_interval = _seconds(
            "heartbeat_interval", response.heartbeat_interval, self.heartbeat_interval
        )
        self.reply_frame_size = self._frame_size
        if 0 < response.max_message_length < MIN_SERVER_MESSAGE_LENGTH:
            raise ProtocolError(
                f"CreateNode: max_message_length: expected 0 or at least "
                f"{MIN_SERVER_MESSAGE_LENGTH} bytes, received {response.max_message_length}"
            )
        if response.max_message_length > 0:
            self.reply_frame_size = min(
                self._frame_size, self._framing.frame_size(response.max_message_length)
            )

    def start_receiving(self) -> None:
        """A new wait for the next instruction: not busy, nothing half received."""
        self.busy = False
        self._reset()

    def _reset(self) -> None:
        self._reader.reset()
        self._receiving = 0

    def pull_request(self) -> PullRequest:
        """The next pull: for the next frame of an instruction being received, else for
        the next instruction."""
        if self._receiving:
            return PullRequest(self.node_id, self._receiving, self._reader.received)
        return PullRequest(self.node_id)

    def pulled(self, response: PullResponse) -> bytes | memoryview | None:
        """Take a pull's response; the whole instruction once it is complete.

        Raises:
            DecodeError: malformed or out-of-order frames.
        """
        if not response.task_id:  # nothing in time: poll again
            self._reset()
            return None
        if response.task_id != self._receiving:  # a new instruction (or the server restarted)
            self._reset()
        self.busy = True
        message = response.server_message  # bytes, decoded (a payload only server-side)
        data = message if isinstance(message, bytes | memoryview) else message.tobytes()
        whole = self._reader.feed(data)
        if whole is None:
            self._receiving = response.task_id
            return None
        self.task_id = response.task_id
        self._receiving = 0
        return whole

    def push_requests(self, payload: Payload) -> Iterator[PushRequest]:
        """The pushes that carry the reply to the current instruction (its frames if it
        is large).

        Raises:
            ConnectionLost: there is no instruction to answer (its session was lost).
        """
        if not self.task_id:
            raise ConnectionLost("send() without an instruction to answer")
        for message in payload.messages(self.reply_frame_size):
            yield PushRequest(self.node_id, self.task_id, message)

    def replied(self) -> None:
        """The reply went through: no instruction is being answered."""
        self.task_id = 0
        self.busy = False

    def heartbeat_request(self) -> SimpleRequest | None:
        """A heartbeat if one is due (the node is busy with an instruction), else None:
        an idle node is long-polling, which proves it is alive."""
        return SimpleRequest(self.node_id) if self.busy and self.node_id else None

    def delete_request(self) -> SimpleRequest | None:
        """The unregistration (None: not registered)."""
        return SimpleRequest(self.node_id) if self.node_id else None

    def unregistered(self) -> None:
        """The node is no longer registered."""
        self.node_id = 0
        self.busy = False
