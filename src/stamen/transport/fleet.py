"""Client side of the Fleet protocol, shared by the grpc-rere and rest transports.

:class:`FleetClientTransport` implements :class:`~stamen.transport.base.ClientTransport`
over a :class:`Requester` (one request, one response), so both request/response transports
share one state machine: register, long-poll, push, heartbeat while busy, unregister. The
two adapters only move bytes and map their library's errors.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Protocol

from ..errors import ConnectionLost, ProtocolError, StamenError, TransportError
from ..messages import Instruction, Reply
from ..protocol.fleet import (
    CreateNodeRequest,
    NodeUnknown,
    PullRequest,
    PushRequest,
    SimpleRequest,
)
from ..wire import FrameReader, Verb, decode_instruction, encode_reply_payload, frame_size
from ..wire import fleet_codec as codec

__all__ = ["FleetClientTransport", "Requester"]

logger = logging.getLogger("stamen.client")

_SLACK = 15.0
"""Seconds a request may take beyond the server's long-poll timeout before we give up."""

_PUSH_ATTEMPTS = 4
_PUSH_FIRST_DELAY = 0.1
"""A failed push is sent again up to 3 times, 0.1, 0.2 and 0.4 s later."""

_SERVER_SECONDS = (0.01, 3600.0)
"""The heartbeat intervals and long-poll timeouts a node accepts from a server."""


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
    low, high = _SERVER_SECONDS
    if not (math.isfinite(value) and low <= value <= high):
        raise ProtocolError(
            f"CreateNode: {name}: expected seconds in [{low:g}, {high:g}], received {value!r}"
        )
    return value


class Requester(Protocol):
    """Sends one Fleet request and returns the response body."""

    def open(self) -> None:
        """Reach the server (raises ConnectError when it cannot be reached)."""
        ...

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """Send ``body`` as ``verb``; raise a mapped Stamen error on failure."""
        ...

    def close(self) -> None:
        """Release connections. Never raises."""
        ...


class FleetClientTransport:
    """A node on a request/response transport (see ClientTransport)."""

    def __init__(
        self, requester: Requester, *, max_message_length: int, request_timeout: float = 30.0
    ) -> None:
        self._requester = requester
        self._max_message_length = max_message_length
        self._frame_size = frame_size(max_message_length)
        self._reply_frame_size = self._frame_size
        self._reader = FrameReader()
        self._request_timeout = request_timeout
        self._node_id = 0
        self._poll_timeout = 10.0
        self._heartbeat_interval = 15.0
        self._task_id = 0
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_error: StamenError | None = None
        self._busy = threading.Event()

    @property
    def node_id(self) -> int:
        """The id the server assigned at registration."""
        return self._node_id

    def connect(self) -> None:
        """Reach the server and register this node."""
        self._requester.open()
        body = codec.encode_create_node_request(
            CreateNodeRequest(max_message_length=self._max_message_length)
        )
        response = codec.decode_create_node_response(
            self._requester.call(Verb.CREATE_NODE, body, self._request_timeout)
        )
        if response.node_id == 0:
            raise ProtocolError("CreateNode: expected a node id, received 0")
        self._node_id = response.node_id  # set first, so that close() unregisters it
        self._poll_timeout = _seconds("poll_timeout", response.poll_timeout, self._poll_timeout)
        self._heartbeat_interval = _seconds(
            "heartbeat_interval", response.heartbeat_interval, self._heartbeat_interval
        )
        self._reply_frame_size = self._frame_size
        if response.max_message_length > 0:
            self._reply_frame_size = min(self._frame_size, frame_size(response.max_message_length))
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"stamen-heartbeat-{self._node_id}", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        """While the node is busy with an instruction, prove it is alive."""
        body = codec.encode_simple_request(SimpleRequest(self._node_id))
        while not self._stop.wait(self._heartbeat_interval):
            if not self._busy.is_set():
                continue  # an idle node is long-polling: that proves it is alive
            try:
                self._requester.call(Verb.HEARTBEAT, body, self._request_timeout)
            except StamenError as exc:
                logger.warning("heartbeat failed: %s", exc)
                self._heartbeat_error = exc
                if isinstance(exc, NodeUnknown):
                    return

    def receive(self) -> Instruction:
        """Long-poll until the server has an instruction for this node."""
        self._busy.clear()
        if isinstance(self._heartbeat_error, NodeUnknown):
            raise self._heartbeat_error
        body = codec.encode_pull_request(PullRequest(self._node_id))
        self._reader.reset()
        task_id = 0
        while True:
            data = self._requester.call(Verb.PULL, body, self._poll_timeout + _SLACK)
            response = codec.decode_pull_response(data)
            if not response.task_id:
                body = codec.encode_pull_request(PullRequest(self._node_id))
                self._reader.reset()
                continue
            if response.task_id != task_id:  # a new instruction (or the server started over)
                self._reader.reset()
                task_id = response.task_id
            whole = self._reader.feed(response.server_message)
            if whole is not None:
                self._task_id = task_id
                self._busy.set()
                return decode_instruction(whole)
            # An instruction in frames: ask for the rest, frame by frame.
            self._busy.set()
            body = codec.encode_pull_request(
                PullRequest(self._node_id, task_id, self._reader.received)
            )

    def send(self, reply: Reply) -> None:
        """Push the reply to the last instruction."""
        if not self._task_id:
            raise ConnectionLost("send() without an instruction to answer")
        payload = encode_reply_payload(reply)
        for message in payload.messages(self._reply_frame_size):  # frames if it is large
            request = PushRequest(self._node_id, self._task_id, message)
            self._push(codec.encode_push_request(request))
        self._task_id = 0
        self._busy.clear()

    def _push(self, body: bytes) -> None:
        """One push, sent again after a transient failure (a dropped connection, a
        timeout): pushes are idempotent (the server ignores a frame it has, and discards a
        reply to a task that has ended), and giving up here would lose the reply, since the
        node registers again with a new id. A server that no longer knows the node, or an
        error retrying cannot fix, ends the attempts at once.
        """
        delay = _PUSH_FIRST_DELAY
        for attempt in range(1, _PUSH_ATTEMPTS + 1):
            try:
                self._requester.call(Verb.PUSH, body, self._request_timeout)
                return
            except TransportError as exc:
                if not exc.retryable or isinstance(exc, NodeUnknown) or attempt == _PUSH_ATTEMPTS:
                    raise
                logger.warning(
                    "push to task %s failed (%s); sending it again in %.1f s (attempt %d of %d)",
                    self._task_id,
                    exc,
                    delay,
                    attempt + 1,
                    _PUSH_ATTEMPTS,
                )
            self._stop.wait(delay)  # returns at once if the node is closing
            if self._stop.is_set():
                raise ConnectionLost(f"node closed while pushing the reply to task {self._task_id}")
            delay *= 2

    def close(self, *, graceful: bool) -> None:
        """Stop heartbeats, unregister (best effort, also when not ``graceful``, so the
        server fails this node's work at once) and release connections."""
        self._stop.set()
        self._busy.clear()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(self._request_timeout)
        if self._node_id:
            body = codec.encode_simple_request(SimpleRequest(self._node_id))
            try:
                self._requester.call(Verb.DELETE_NODE, body, 5.0 if graceful else 2.0)
            except StamenError as exc:
                logger.info("could not unregister node %s: %s", self._node_id, exc)
        self._node_id = 0
        self._requester.close()
