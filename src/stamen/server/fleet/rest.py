"""The Fleet protocol over HTTP/1.1 (rest): a small server of our own, on h11.

``POST /api/v0/stamen/fleet/<verb>`` (``wire.routes.REST_PREFIX``) with an
``application/protobuf`` body; the response is the protobuf response, or an error status
with a ``text/plain`` reason. Flower 1.12's Fleet API is served beside it, on
``POST /api/v0/fleet/<path>`` (``wire.flower_routes``; Flower's node asks for some paths
with a doubled slash, ``//api/v0/fleet/get-run``: repeated slashes are read as one). The
server runs on the fleet's own event loop, beside the gRPC server.

Each connection is an :class:`asyncio.Protocol` whose state is its :class:`h11.Connection`:
bytes that arrive go into h11, the events h11 parses out of them drive the request, and
what h11 renders is written back. Keep-alive and pipelining are h11's state machine.

Every wait on a client is bounded, so no client holds a connection (a file descriptor)
and its state for ever:

- a request's body must arrive whole within the request deadline
  (:meth:`FleetTiming.deadline_for` its declared length), however it trickles: 503;
- with node authentication, a request's headers are checked (key authorized, timestamp
  fresh) before its body is read: 401 at once otherwise;
- bodies being read or served, not yet answered, hold at most ``max_unverified_bytes``
  (``Fleet.unverified``, shared with the gRPC listener) in all: a
  body that would go over is refused (503);
- connections open at once are bounded per IP address (more are closed as they arrive)
  and in all: at the limit, the connection that has waited longest without sending a
  whole request is closed to make room for the new one, so slow or idle clients cannot
  lock a node out; a WARNING (at most one per 10 s) says either;
- a request's headers must be complete within :func:`body_idle_limit` of the
  connection's opening or of the previous response (a client that starts a request and
  stops, or keeps a connection open and idle);
- a body may send nothing for at most that long (a stalled or hostile client): 503;
- a client still sending a body after its refusal gets as long again to stop and read
  the answer before the connection is closed;
- an answer the client reads none of for that long is cut off;
- a TLS handshake has asyncio's limit (60 s).

The server's own work is not bounded here: a long-poll (``PULL``) is answered after the
fleet's poll timeout, however long that is.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import math
import re
import resource
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote

import h11

from ...errors import ConfigError
from ...protocol.fleet import ERRORS, ErrorKind, FleetError
from ...wire import FLOWER_REST_CONTENT_TYPE, REST_CONTENT_TYPE, FlowerCall, Verb
from .flower import FlowerFleet
from .handler import Fleet, peer_host

__all__ = ["RestListener", "body_idle_limit"]

logger = logging.getLogger("stamen.server")

_MIN_BODY_IDLE = 5.0
_GRACE = 2.0
"""Seconds :meth:`RestListener.stop` gives requests in flight to finish."""
_BACKLOG = 2048
"""Connections the kernel queues before they are accepted: room for thousands of nodes
connecting at once."""
_JOIN_BELOW = 64 * 1024
"""Responses with a body under this size are written in one piece, head and body."""
Route = Verb | FlowerCall
"""A request's call: Stamen's Fleet protocol, or Flower's Fleet API."""
_ROUTES: dict[str, Route] = {
    **{verb.rest_path: verb for verb in Verb},
    **{call.rest_path: call for call in FlowerCall},
}
_SLASHES = re.compile(r"/{2,}")


def body_idle_limit(fleet: Fleet) -> float:
    """Seconds a request body may send nothing before it is given up: as long as a silent
    node is tolerated (the heartbeat timeout), and at least 5 s. Request headers get as
    long to complete."""
    return max(fleet.timing.silence_limit, _MIN_BODY_IDLE)


class _Headers(Mapping[str, str]):
    """A request's headers by case-insensitive name (lower-case keys; the first value of
    a repeated header), decoded as latin-1: what node signatures are checked against."""

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._values: dict[str, str] = {}
        for name, value in raw:
            self._values.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True)
class _Reply:
    """A response to render: status, body and its content type."""

    status: int
    body: bytes
    content_type: str
    close: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    def head(self, close: bool) -> list[tuple[str, str]]:
        headers = [("content-type", self.content_type), ("content-length", str(len(self.body)))]
        if close:
            headers.append(("connection", "close"))
        return [*headers, *self.extra]


def _plain(status: int, reason: str, *, close: bool = False, **extra: str) -> _Reply:
    return _Reply(status, reason.encode(), "text/plain; charset=utf-8", close, tuple(extra.items()))


def _error(kind: ErrorKind, message: str, *, close: bool = False) -> _Reply:
    return _plain(ERRORS[kind].http_status, message, close=close)


def _route(request: h11.Request, headers: Mapping[str, str]) -> Route | _Reply:
    """The call a request's head asks for, or the refusal it gets before its body."""
    path = _SLASHES.sub("/", unquote(request.target.decode("latin-1").split("?", 1)[0]))
    verb = _ROUTES.get(path)
    if verb is None:
        return _plain(404, "Not Found")
    if request.method != b"POST":
        return _plain(405, "Method Not Allowed", allow="POST")
    content_type = headers.get("content-type", "").split(";")[0].strip()
    expected = REST_CONTENT_TYPE if isinstance(verb, Verb) else FLOWER_REST_CONTENT_TYPE
    if content_type != expected:
        return _plain(415, f"content-type: expected {expected}, received {content_type!r}")
    return verb


@dataclass
class _Body:
    """The body of the request being read; ``verb`` None once it has been answered (what
    still comes is discarded)."""

    verb: Route | None
    headers: _Headers
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    held: int = 0
    """Bytes of it counted against the site's budget of unverified bytes."""
    deadline: float = math.inf
    """Loop time by which the whole body must have arrived."""


_CLOSE_WAIT = 10.0
"""Seconds to wait, at most, for aborted connections to finish closing."""

_ACCEPT_TURNS = 5
"""Loop turns an accept under way needs to make its connection (a few: the socket is
accepted, its transport built, then the protocol told)."""


class _Site:
    """What every connection of one listener shares: the fleet, the limits, the
    connections and requests being served, and whether the listener is stopping."""

    def __init__(
        self,
        fleet: Fleet,
        max_body: int,
        loop: asyncio.AbstractEventLoop,
        flower: FlowerFleet | None = None,
    ) -> None:
        self.fleet = fleet
        self.flower = flower
        self.max_body = max_body
        self.limit = body_idle_limit(fleet)
        self.loop = loop
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        timing = fleet.timing
        self.max_connections, self.max_per_peer = timing.rest_connection_limits(descriptor_limit())
        self.per_peer: dict[str, int] = {}
        self.open = 0
        self.budget = fleet.unverified  # shared with the gRPC listener
        self.refused = 0
        self.evicted = 0
        self.waiting: dict[_Connection, None] = {}
        """Counted connections without a whole request (awaiting one, or reading its
        body), the one that has waited longest first."""
        self._warned = -math.inf

    def admit(self, connection: _Connection, host: str) -> bool:
        """Count a new connection from ``host``; False (with a rate-limited WARNING) when
        it is one too many from that address. At the limit in all, the connection that
        has waited longest without sending a whole request is closed to make room (a
        slow or idle client gives way to a new one); only when every connection is being
        served is the new one refused."""
        count = self.per_peer.get(host, 0)
        if count < self.max_per_peer and self.open >= self.max_connections:
            self._evict_oldest()
        if self.open < self.max_connections and count < self.max_per_peer:
            self.open += 1
            self.per_peer[host] = count + 1
            self.waiting[connection] = None
            return True
        self.refused += 1
        if self._should_warn():
            logger.warning(
                "rest: refusing connections: %d open (limit %d), %d from %s (limit %d per "
                "address); %d refused so far (FleetTiming.max_connections, "
                "max_connections_per_peer)",
                self.open,
                self.max_connections,
                count,
                host,
                self.max_per_peer,
                self.refused,
            )
        return False

    def _evict_oldest(self) -> None:
        """Close the connection that has waited longest for a whole request, if any."""
        oldest = next(iter(self.waiting), None)
        if oldest is None:
            return
        self.evicted += 1
        if self._should_warn():
            logger.warning(
                "rest: %d connections open (limit %d, FleetTiming.max_connections): closing "
                "the one from %s, %.1f s without a whole request, to make room; %d closed "
                "so far",
                self.open,
                self.max_connections,
                oldest.peer,
                self.loop.time() - oldest.waiting_since,
                self.evicted,
            )
        oldest.evict()

    def _should_warn(self) -> bool:
        now = self.loop.time()
        if now - self._warned < 10.0:
            return False
        self._warned = now
        return True

    def release(self, connection: _Connection, host: str) -> None:
        """A counted connection from ``host`` closed (or is being closed)."""
        self.waiting.pop(connection, None)
        self.open -= 1
        left = self.per_peer.get(host, 1) - 1
        if left > 0:
            self.per_peer[host] = left
        else:
            self.per_peer.pop(host, None)

    def refusal(self, request: h11.Request, headers: _Headers) -> Route | _Reply:
        """The call of a request, or its answer before its body: a route or content type
        we do not serve, or a declared length over ``max_body``."""
        routed = _route(request, headers)
        if isinstance(routed, FlowerCall) and self.flower is None:
            return _plain(404, "Not Found")
        declared = headers.get("content-length", "")
        over = declared.isdigit() and int(declared) > self.max_body
        if not isinstance(routed, _Reply) and over:
            message = f"body of {declared} bytes is over the limit of {self.max_body}"
            return _error(ErrorKind.TOO_LARGE, message, close=True)
        try:
            if isinstance(routed, Verb):
                self.fleet.precheck(f"POST {routed.rest_path}", headers)
            elif isinstance(routed, FlowerCall) and self.flower is not None:
                self.flower.precheck(routed, "rest", headers)
        except FleetError as exc:  # before a byte of the body is read
            return _error(exc.kind, exc.message, close=True)
        return routed

    async def respond(self, verb: Route, body: bytes, headers: _Headers, peer: str) -> _Reply:
        """The fleet's answer to one request."""
        try:
            if isinstance(verb, FlowerCall):
                assert self.flower is not None  # refused before its body otherwise
                out, _ = await self.flower.handle(verb, body, "rest", peer, headers=headers)
            else:
                out = await self.fleet.handle(
                    verb, body, "rest", peer, method=f"POST {verb.rest_path}", headers=headers
                )
        except FleetError as exc:
            if exc.kind is ErrorKind.RATE_LIMITED:
                body = exc.message.encode()
                return _Reply(429, body, "text/plain; charset=utf-8", extra=(("retry-after", "1"),))
            return _error(exc.kind, exc.message)
        except Exception:
            logger.exception("rest: POST %s from %s failed", verb.rest_path, peer)
            return _plain(500, "Internal Server Error", close=True)
        return _Reply(200, out, REST_CONTENT_TYPE)

    async def close(self, grace: float) -> None:
        """Close idle connections, give the others ``grace`` seconds, then cut them."""
        self.stopping = True
        for connection in list(self.connections):
            connection.close_if_idle()
        await self._settle(grace)
        for connection in list(self.connections):
            connection.abort()
        for task in self.tasks:
            task.cancel()
        # Aborted connections close on the loop's next turns: wait for them (bounded,
        # but not by the grace period, which a busy machine can use up), so that no
        # socket outlives the loop that owns it.
        await self._settle(_CLOSE_WAIT)
        # A connection whose accept was under way when the listener closed is made on
        # the loop's next turns (and aborted at once): wait for those too.
        for _ in range(_ACCEPT_TURNS):
            await asyncio.sleep(0)
        for connection in list(self.connections):
            connection.abort()
        await self._settle(_CLOSE_WAIT)
        # An aborted transport closes its socket in a callback of the loop's next turn:
        # let those run before the loop may stop.
        for _ in range(_ACCEPT_TURNS):
            await asyncio.sleep(0)

    async def _settle(self, timeout: float) -> None:
        waits = [c.lost for c in self.connections] + list(self.tasks)
        if waits:
            await asyncio.wait(waits, timeout=timeout)


def descriptor_limit() -> int:
    """The process's soft limit of open file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _peer(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "?"


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small responses at once: without TCP_NODELAY each waits ~40 ms for the
    client's delayed ACK (Nagle's algorithm)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: bytes in and out at the edge, its state in h11.

    One timer at a time bounds what the connection waits for: the next request's
    headers, a body that keeps arriving, or a refused body's client hanging up.
    """

    _transport: asyncio.Transport

    def __init__(self, site: _Site) -> None:
        self._site = site
        self._h11 = h11.Connection(h11.SERVER)
        self._peer = "?"
        self.waiting_since = 0.0
        """Loop time since which the connection has waited for a whole request."""
        self._host: str | None = None  # counted by the site while set
        self._timer: asyncio.TimerHandle | None = None
        self._begun = False  # a byte of the awaited request's head has come
        self._body: _Body | None = None
        self._last_data = 0.0
        self._lingering = False
        self._head_only = False
        self._task: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost: asyncio.Future[None] = site.loop.create_future()

    # --- asyncio's calls ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream server's
        self._site.connections.add(self)  # tracked until connection_lost, even when refused
        if self._site.stopping:
            self._transport.abort()
            return
        self._peer = _peer(transport)
        host = peer_host(self._peer)
        self.waiting_since = self._site.loop.time()
        if not self._site.admit(self, host):
            self._transport.abort()
            return
        self._host = host
        _no_delay(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        self._begun = True
        self._last_data = self._site.loop.time()
        self._h11.receive_data(data)
        self._advance()

    def eof_received(self) -> bool:
        if self._body is not None:
            return False  # hung up mid-body: close (connection_lost says if it mattered)
        self._h11.receive_data(b"")
        self._advance()
        # Keep writing to a client that half-closed after its request, except on TLS
        # (where asyncio closes the transport whatever we return).
        return self._task is not None and self._transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._site.connections.discard(self)
        self._uncount()
        self._unhold()
        self._writable.set()
        if self._body is not None and self._body.verb is not None:
            # Not an application error: anyone may hang up mid-body.
            logger.debug(
                "rest: %s hung up after %d bytes of a request body", self._peer, self._body.size
            )
        self._body = None
        if not self.lost.done():
            self.lost.set_result(None)

    # --- stopping -----------------------------------------------------------------------

    def close_if_idle(self) -> None:
        """Close the connection unless a request is being read or served."""
        if self._task is None and (self._body is None or self._body.verb is None):
            self._transport.close()

    @property
    def peer(self) -> str:
        """``host:port`` of the client."""
        return self._peer

    def _uncount(self) -> None:
        if self._host is not None:
            self._site.release(self, self._host)
            self._host = None

    def evict(self) -> None:
        """Cut the connection now to make room for a new one: it no longer counts."""
        self._uncount()
        self._unhold()
        self.abort()

    def abort(self) -> None:
        """Cut the connection now."""
        if self._task is not None:
            self._task.cancel()
        self._transport.abort()

    # --- the events h11 parses ----------------------------------------------------------

    def _advance(self) -> None:
        """Act on every event h11 has, until it needs more bytes or a request is served."""
        while self._task is None and not self._transport.is_closing():
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc)
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self._on_data(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._on_end()
            elif isinstance(event, h11.ConnectionClosed):
                self._transport.close()
            else:  # NEED_DATA, or PAUSED until the response is sent
                return

    def _on_request(self, request: h11.Request) -> None:
        self._head_only = request.method == b"HEAD"  # its answer has headers only
        headers = _Headers(request.headers)
        routed = self._site.refusal(request, headers)
        self._body = _Body(None if isinstance(routed, _Reply) else routed, headers)
        declared = headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else self._site.max_body
        deadline = self._site.fleet.timing.deadline_for(min(size, self._site.max_body))
        self._body.deadline = self._site.loop.time() + deadline
        self._await_body()
        if isinstance(routed, _Reply):
            self._answer_early(routed)
        elif self._h11.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self._write(self._h11.send(go_on))

    def _on_data(self, data: bytes) -> None:
        body = self._body
        if body is None:
            return
        body.size += len(data)
        over = body.size > self._site.max_body
        if body.verb is None:  # answered already: discarded
            if over and not self._lingering:
                self._linger()
        elif over:
            message = f"body is over the limit of {self._site.max_body} bytes"
            self._answer_early(_error(ErrorKind.TOO_LARGE, message, close=True))
        elif not self._site.budget.take(len(data)):
            budget = self._site.budget
            if budget.should_warn(self._site.loop.time()):
                logger.warning(
                    "rest: refusing a body from %s: requests being received or served hold "
                    "%d bytes, the limit (FleetTiming.max_unverified_bytes) is %d; %d "
                    "refused so far",
                    self._peer,
                    budget.held,
                    budget.limit,
                    budget.refused,
                )
            message = "the server is reading too many request bodies at once; retry later"
            self._answer_early(_error(ErrorKind.UNAVAILABLE, message, close=True))
        else:
            body.chunks.append(data)
            body.held += len(data)

    def _unhold(self) -> None:
        """The body being read no longer counts against the budget (handed on, dropped)."""
        body = self._body
        if body is not None and body.held:
            self._site.budget.give(body.held)
            body.held = 0

    def _on_end(self) -> None:
        self._cancel_timer()
        body = self._body
        if body is None or body.verb is None:
            self._unhold()
            self._body = None
            self._next_cycle()
            return
        self._body = None  # its bytes stay held until the request is answered
        self._site.waiting.pop(self, None)
        self._transport.pause_reading()  # a pipelined request waits for this response
        task = self._site.loop.create_task(
            self._serve(body.verb, b"".join(body.chunks), body.headers, body.held)
        )
        self._task = task
        self._site.tasks.add(task)
        task.add_done_callback(self._site.tasks.discard)

    def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer bytes that are no HTTP/1.1 request with a 4xx, and close."""
        logger.debug("rest: invalid HTTP/1.1 from %s: %s", self._peer, exc)
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._send(_plain(status, "invalid HTTP/1.1 request", close=True))
        self._transport.close()

    # --- answers ------------------------------------------------------------------------

    async def _serve(self, verb: Route, body: bytes, headers: _Headers, held: int) -> None:
        try:
            reply = await self._site.respond(verb, body, headers, self._peer)
        finally:
            self._site.budget.give(held)  # answered (or cut off): no longer held
        self._send(reply)
        await self._drained()  # a client that does not read gets nothing more
        self._task = None
        self._next_cycle()
        self._advance()  # a pipelined request, if any

    async def _drained(self) -> None:
        """Wait until the answer is mostly written. A client that reads none of it for the
        limit would otherwise hold its connection, and the answer's memory, for ever: it
        is cut off."""
        while not self._writable.is_set():
            unsent = self._transport.get_write_buffer_size()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._writable.wait(), self._site.limit)
            if not self._writable.is_set() and self._transport.get_write_buffer_size() >= unsent:
                logger.debug("rest: cutting off %s: it reads no answer", self._peer)
                self._transport.abort()
                return

    def _answer_early(self, reply: _Reply) -> None:
        """Answer before the body is in; what is left of the body is discarded."""
        self._unhold()
        if self._body is not None:
            self._body.verb = None
            self._body.chunks = []
        self._send(reply)
        if self._h11.our_state is h11.MUST_CLOSE:
            self._linger()

    def _send(self, reply: _Reply) -> None:
        if self._transport.is_closing():
            return
        close = reply.close or self._site.stopping
        phrase = http.HTTPStatus(reply.status).phrase.encode()
        response = h11.Response(status_code=reply.status, headers=reply.head(close), reason=phrase)
        body = b"" if self._head_only else reply.body
        try:
            head = self._h11.send(response) or b""
            if body:
                self._h11.send_with_data_passthrough(h11.Data(data=body))  # written below
            self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:  # no answer fits h11's state: hang up
            logger.debug("rest: closing a connection from %s: %s", self._peer, exc)
            self._transport.close()
            return
        if len(body) < _JOIN_BELOW:
            self._transport.write(head + body)
        else:
            self._transport.write(head)
            self._transport.write(body)

    def _write(self, data: bytes | None) -> None:
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def _next_cycle(self) -> None:
        """After a response: await the next request, or close."""
        if self._transport.is_closing():
            return
        states = (self._h11.our_state, self._h11.their_state)
        if self._site.stopping or states != (h11.DONE, h11.DONE):
            self._transport.close()
            return
        self._h11.start_next_cycle()
        self._await_headers()
        self._transport.resume_reading()

    # --- deadlines ----------------------------------------------------------------------

    def _set_timer(self, delay: float, callback: Callable[[], object]) -> None:
        self._cancel_timer()
        self._timer = self._site.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _await_headers(self) -> None:
        """Headers are due within the limit: a client that starts a request and stops, or
        leaves its connection idle, would otherwise hold the connection for ever."""
        self._begun = bool(self._h11.trailing_data[0])  # pipelined bytes already in
        self._head_only = False
        if self._host is not None:  # counted: waits for a whole request again, newest
            self.waiting_since = self._site.loop.time()
            self._site.waiting.pop(self, None)
            self._site.waiting[self] = None
        self._set_timer(self._site.limit, self._headers_late)

    def _headers_late(self) -> None:
        self._timer = None
        # An idle kept-alive connection is routine; a request cut short is not.
        log = logger.warning if self._begun else logger.debug
        log(
            "rest: closing a connection from %s: no complete request headers within %g s",
            self._peer,
            self._site.limit,
        )
        self._transport.close()

    def _await_body(self) -> None:
        """The body may be silent for at most the limit, and must be whole by its
        deadline: a stalled, dripping or hostile client would otherwise hold its
        connection, and the request's state, for ever."""
        now = self._last_data = self._site.loop.time()
        deadline = self._body.deadline if self._body is not None else math.inf
        self._set_timer(min(self._site.limit, max(0.0, deadline - now)), self._body_due)

    def _body_due(self) -> None:
        self._timer = None
        now = self._site.loop.time()
        silent = now - self._last_data
        body = self._body
        deadline = body.deadline if body is not None and body.verb is not None else math.inf
        if silent < self._site.limit and now < deadline:  # bytes came since: check again
            self._set_timer(min(self._site.limit - silent, deadline - now), self._body_due)
            return
        if body is not None and body.verb is not None:
            if silent >= self._site.limit:
                limit = self._site.limit
                message = f"the body stalled: nothing for {limit:g} s after {body.size} bytes"
            else:
                message = (
                    f"the body did not arrive within the request deadline: {body.size} bytes so far"
                )
                logger.warning("rest: %s: %s", self._peer, message)
            self._send(_error(ErrorKind.UNAVAILABLE, message, close=True))
        self._unhold()
        self._transport.close()

    def _linger(self) -> None:
        """After a refusal that closes the connection, read and discard what the client
        still sends for at most the limit (or until its body ends) before closing:
        closing at once with its bytes unread would reset the connection, and the client
        could lose the answer."""
        self._lingering = True
        self._set_timer(self._site.limit, self._transport.close)


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"rest_address: cannot listen on {host}:{port} ({exc.strerror})") from exc
    return sock


class RestListener:
    """The REST server on a socket we bind (so port 0 works), on the running loop.

    Args:
        fleet: What answers the requests.
        address: ``(host, port)`` to listen on.
        max_body: Largest request body accepted (bytes); larger ones get 413.
        ssl_context: Serve HTTPS with this context (see :meth:`tls_context`), or None.
        flower: Serve Flower 1.12's Fleet API too (None: only Stamen's routes).

    Raises:
        ConfigError: ``address`` cannot be bound.
    """

    def __init__(
        self,
        fleet: Fleet,
        address: tuple[str, int],
        *,
        max_body: int,
        ssl_context: ssl.SSLContext | None = None,
        flower: FlowerFleet | None = None,
    ) -> None:
        self._socket = _bind(*address)
        self._flower = flower
        self.port = int(self._socket.getsockname()[1])
        self._fleet = fleet
        self._max_body = max_body
        self._ssl = ssl_context
        self._site: _Site | None = None
        self._server: asyncio.Server | None = None

    @staticmethod
    def tls_context(
        ca_cert: bytes, cert_file: str, key_file: str, *, require_client_certificate: bool = False
    ) -> ssl.SSLContext:
        """A server context with the certificate chain and key in ``cert_file`` and
        ``key_file`` (:mod:`ssl` reads them from files only); with
        ``require_client_certificate``, clients must present a certificate signed by
        ``ca_cert`` (PEM bytes)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cadata=ca_cert.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        return context

    async def start(self) -> None:
        """Start serving (on the running loop)."""
        loop = asyncio.get_running_loop()
        site = self._site = _Site(self._fleet, self._max_body, loop, self._flower)
        self._server = await loop.create_server(
            lambda: _Connection(site), sock=self._socket, ssl=self._ssl, backlog=_BACKLOG
        )

    async def stop(self) -> None:
        """Stop listening, close idle connections, give requests in flight 2 s to finish,
        then close the rest."""
        server, site = self._server, self._site
        self._server = self._site = None
        if server is not None and site is not None:
            # Stop accepting first, and let accepts under way finish while the server is
            # still open: asyncio attaches each new connection to its server, which fails
            # once the server is closed, and then leaves the accepted socket open for
            # good (its peer waits for an answer that never comes).
            site.stopping = True
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            for _ in range(_ACCEPT_TURNS):
                await asyncio.sleep(0)
            server.close()
            await site.close(_GRACE)
            if sys.version_info >= (3, 13):
                server.abort_clients()  # connections still in their TLS handshake
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _GRACE)
        self._socket.close()
