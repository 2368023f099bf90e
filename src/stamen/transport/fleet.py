"""Client side of the Fleet protocol, shared by the grpc-rere and rest transports.

:class:`FleetClientTransport` implements :class:`~stamen.transport.base.ClientTransport`
over a :class:`Requester` (one request, one response), so both request/response transports
share one state machine: register, long-poll, push, heartbeat while busy, unregister. The
two adapters only move bytes and map their library's errors.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Protocol

from ..errors import ConnectionLost, StamenError, Timeout, TransportError
from ..messages import Instruction, Reply
from ..protocol.fleet import NodeUnknown, PushRequest
from ..protocol.fleet_client import FleetClientState
from ..wire import (
    FRAMING,
    FrameReader,
    RefusedResult,
    Verb,
    decode_server_message,
    encode_reply_payload,
)
from ..wire import fleet_codec as codec

__all__ = ["FleetClientTransport", "Requester"]

logger = logging.getLogger("stamen.client")

_PUSH_ATTEMPTS = 4
_PUSH_FIRST_DELAY = 0.1
"""A failed push is sent again up to 3 times, 0.1, 0.2 and 0.4 s later."""

_PUSH_MARGIN = 15.0
"""Seconds past its request timeout that one attempt of a push may take, at most: what a
requester waits past gRPC's deadline, and the delay before the attempt."""

PUSHES_IN_FLIGHT = 2
"""Frames of a large reply pushed at once, after the first (which goes alone: it may
wait on the server for its turn to be received). One at a time, each frame's round trip
(the server taking it, the answer, the next request starting) left both ends idle: a
10 x 100 MB round on grpc-rere took 1.4x grpc-bidi's (bench/HISTORY.md). The server
takes frames that overtake an earlier one in order (``Fleet.receive``)."""

_PUSHER_THREADS = 8
_pushers: tuple[int, ThreadPoolExecutor] | None = None
_pushers_lock = threading.Lock()


def _pusher() -> ThreadPoolExecutor:
    """The process's threads for pushes in flight beside a node's own (made on first
    use, and again in a forked child: the parent's threads are not in it)."""
    global _pushers
    with _pushers_lock:
        if _pushers is None or _pushers[0] != os.getpid():
            pool = ThreadPoolExecutor(_PUSHER_THREADS, thread_name_prefix="stamen-push")
            _pushers = (os.getpid(), pool)
        return _pushers[1]


def _ended(push: Future[None], bound: float) -> None:
    """Wait for ``push`` to end; raise what it raised."""
    try:
        push.result(bound)
    except TimeoutError as exc:
        if isinstance(exc, StamenError):  # the push's own Timeout
            raise
        raise Timeout(f"a push of a reply's frame did not end within {bound:g} s") from exc


class Requester(Protocol):
    """Sends one Fleet request and returns the response body. :meth:`call` is made from
    several threads at once (a node's heartbeats, and its pushes in flight)."""

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
    """A node on a request/response transport (see ClientTransport): the IO shell of a
    :class:`~stamen.protocol.fleet_client.FleetClientState`."""

    def __init__(
        self,
        requester: Requester,
        *,
        max_message_length: int,
        request_timeout: float = 30.0,
        max_model_bytes: int | None = None,
    ) -> None:
        self._requester = requester
        reader = FrameReader(max_model_bytes) if max_model_bytes is not None else None
        self._state = FleetClientState(FRAMING, max_message_length, reader)
        self._request_timeout = request_timeout
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_error: StamenError | None = None
        self._refused: RefusedResult | None = None

    @property
    def node_id(self) -> int:
        """The id the server assigned at registration."""
        return self._state.node_id

    @property
    def foreign_peer(self) -> str | None:
        """Why the server seems not to speak Stamen's Fleet protocol (what it answered to
        CreateNode), or None. Set by requesters that can tell (``foreign_peer``)."""
        why = getattr(self._requester, "foreign_peer", None)
        return why if isinstance(why, str) else None

    def connect(self) -> None:
        """Reach the server and register this node."""
        self._requester.open()
        body = codec.encode_create_node_request(self._state.create_request())
        response = self._requester.call(Verb.CREATE_NODE, body, self._request_timeout)
        self._state.registered(codec.decode_create_node_response(response))
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"stamen-heartbeat-{self.node_id}", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        """While the node is busy with an instruction, prove it is alive."""
        while not self._stop.wait(self._state.heartbeat_interval):
            beat = self._state.heartbeat_request()
            if beat is None:
                continue
            try:
                body = codec.encode_simple_request(beat)
                self._requester.call(Verb.HEARTBEAT, body, self._request_timeout)
            except StamenError as exc:
                logger.warning("heartbeat failed: %s", exc)
                self._heartbeat_error = exc
                if isinstance(exc, NodeUnknown):
                    return

    def receive(self) -> Instruction:
        """Long-poll until the server has an instruction for this node."""
        state = self._state
        state.start_receiving()
        if isinstance(self._heartbeat_error, NodeUnknown):
            raise self._heartbeat_error
        while True:
            body = codec.encode_pull_request(state.pull_request())
            data = self._requester.call(Verb.PULL, body, state.pull_timeout)
            whole = state.pulled(codec.decode_pull_response(data))
            if whole is not None:
                instruction, self._refused = decode_server_message(whole)
                return instruction

    def refused_result(self) -> RefusedResult | None:
        """The refusal notice that came with the last instruction (a Stamen server's)."""
        return self._refused

    def send(self, reply: Reply) -> None:
        """Push the reply to the last instruction: its first (or only) frame, then the
        others :data:`PUSHES_IN_FLIGHT` at a time."""
        pushes = self._state.push_requests(encode_reply_payload(reply))
        first = next(pushes)
        self._push(codec.encode_push_request(first), first.task_id)
        self._push_rest(pushes)
        self._state.replied()

    def _push_rest(self, pushes: Iterator[PushRequest]) -> None:
        """Push ``pushes`` in order, up to :data:`PUSHES_IN_FLIGHT` at once; the next one
        is encoded while they travel. The first failure ends it (once the pushes in
        flight have ended: none goes on after this returns)."""
        in_flight: deque[Future[None]] = deque()
        # Past every attempt's own bound (the request timeout, a requester's margin past
        # it, the delays between attempts): only a push that hangs outside them waits so.
        bound = _PUSH_ATTEMPTS * (self._request_timeout + _PUSH_MARGIN)
        try:
            for push in pushes:
                body = codec.encode_push_request(push)
                in_flight.append(_pusher().submit(self._push, body, push.task_id))
                if len(in_flight) >= PUSHES_IN_FLIGHT:
                    _ended(in_flight[0], bound)
                    in_flight.popleft()
            while in_flight:
                _ended(in_flight[0], bound)
                in_flight.popleft()
        finally:
            for pending in in_flight:
                pending.cancel()
            wait_all(in_flight, bound)

    def _push(self, body: bytes, task_id: int) -> None:
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
                    task_id,
                    exc,
                    delay,
                    attempt + 1,
                    _PUSH_ATTEMPTS,
                )
            self._stop.wait(delay)  # returns at once if the node is closing
            if self._stop.is_set():
                raise ConnectionLost(f"node closed while pushing the reply to task {task_id}")
            delay *= 2

    def close(self, *, graceful: bool) -> None:
        """Stop heartbeats, unregister (best effort, also when not ``graceful``, so the
        server fails this node's work at once) and release connections."""
        self._stop.set()
        self._state.start_receiving()  # not busy: no heartbeat goes out any more
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(self._request_timeout)
        gone = self._state.delete_request()
        if gone is not None:
            body = codec.encode_simple_request(gone)
            try:
                self._requester.call(Verb.DELETE_NODE, body, 5.0 if graceful else 2.0)
            except StamenError as exc:
                logger.info("could not unregister node %s: %s", gone.node_id, exc)
        self._state.unregistered()
        self._requester.close()
