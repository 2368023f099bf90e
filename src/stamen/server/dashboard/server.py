"""The dashboard's web server: a small read-only HTTP/1.1 server on h11 and asyncio.

It runs on an event loop thread of its own (never the fleet's), so nothing a browser
does can slow the nodes' traffic or the rounds. Routes (all ``GET``; ``HEAD`` too):

- ``/``: the page; ``/static/<file>``: its script, styles and the vendored chart library;
- ``/api/state``: :meth:`DashboardState.snapshot` as JSON;
- ``/api/history``: :meth:`DashboardState.history` as JSON;
- ``/api/events``: server-sent events: ``state`` (the snapshot) after every change, at
  most :data:`STREAM_INTERVAL` apart, and ``history`` when a round ended; a comment every
  :data:`KEEPALIVE` seconds; the stream ends when the dashboard stops.

Access: on a loopback address with no token, a request must name a loopback host in its
``Host`` header (a web page elsewhere cannot read the dashboard through DNS rebinding).
With a token (required on any other address: given, from ``STAMEN_DASHBOARD_TOKEN``, or
generated and logged), every request must carry it, as ``?token=`` or
``Authorization: Bearer``; it is compared in constant time.

Bounds: at most :data:`MAX_CONNECTIONS` connections (more are answered 503 and closed),
of which :data:`MAX_STREAMS` event streams; a request's head must arrive within
:data:`REQUEST_LIMIT` seconds and be under 16 KiB; a client that reads nothing of an
answer for :data:`WRITE_LIMIT` seconds is cut off; requests have no body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import ipaddress
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from ...errors import ConfigError
from ...net.address import parse_address
from ...net.loop import LoopThread
from .state import DashboardState

__all__ = [
    "KEEPALIVE",
    "MAX_CONNECTIONS",
    "MAX_STREAMS",
    "REQUEST_LIMIT",
    "STREAM_INTERVAL",
    "TOKEN_ENV",
    "WRITE_LIMIT",
    "DashboardServer",
    "dashboard_address",
]

logger = logging.getLogger("stamen.server")

MAX_CONNECTIONS = 32
MAX_STREAMS = 8
REQUEST_LIMIT = 10.0
WRITE_LIMIT = 10.0
KEEPALIVE = 15.0
STREAM_INTERVAL = 0.2
TOKEN_ENV = "STAMEN_DASHBOARD_TOKEN"
_MAX_HEAD = 16 * 1024
_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
_LOOPBACK_NAMES = {"localhost", "localhost."}


def dashboard_address(address: str) -> str:
    """``host:port`` for the dashboard from what a person typed: ``PORT`` or ``:PORT``
    mean ``127.0.0.1:PORT``. For the CLI's ``--dashboard``.

    Raises:
        ConfigError: not an address.
    """
    text = address.strip()
    if text.startswith(":"):
        text = text[1:]
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    parse_address(text, field="dashboard_address")
    return text


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host of a ``Host`` header value (no port, no brackets)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra: tuple[tuple[str, str], ...] = ()


def _plain(status: int, text: str, *extra: tuple[str, str]) -> _Reply:
    return _Reply(status, text.encode(), extra=extra)


def _json(data: Any) -> _Reply:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return _Reply(200, body, "application/json")


def _event(name: str, data: Any) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {name}\ndata: {payload}\n\n".encode()


class DashboardServer:
    """Serves a :class:`DashboardState` to browsers (see the module docstring).

    Args:
        state: What to show.
        address: ``host:port`` to listen on (port 0 picks a free one).
        token: The access token; None: ``STAMEN_DASHBOARD_TOKEN`` if set, else none on a
            loopback address and a generated one on any other.
        max_connections, max_streams, request_limit, write_limit: The bounds above.

    Raises:
        ConfigError: ``address`` is not an address, or ``token`` is empty.
    """

    def __init__(
        self,
        state: DashboardState,
        address: str = "127.0.0.1:0",
        *,
        token: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_streams: int = MAX_STREAMS,
        request_limit: float = REQUEST_LIMIT,
        write_limit: float = WRITE_LIMIT,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.host, self._port = parse_address(address, field="dashboard_address")
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        if token is not None and not token.strip():
            raise ConfigError("dashboard_token: an empty token would let anyone in")
        self.generated_token = token is None and not _is_loopback(self.host)
        self.token: str | None = secrets.token_urlsafe(24) if self.generated_token else token
        self.state = state
        self._max_connections = max_connections
        self._max_streams = max_streams
        self._request_limit = request_limit
        self._write_limit = write_limit
        self._keepalive = keepalive
        self._files = {name: self._load(name) for name in (*_STATIC, "index.html")}
        self._loop_thread: LoopThread | None = None  # made by start
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stream_tasks: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Event | None = None
        self._changed: set[asyncio.Event] = set()
        self._wake_pending = False
        self._unwatch: Any = None
        self.port = 0

    @staticmethod
    def _load(name: str) -> bytes:
        return resources.files(__package__).joinpath("static", name).read_bytes()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The page's address (with ``?token=`` when a token is required)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        query = "" if self.token is None else f"?token={self.token}"
        return f"http://{host}:{self.port}/{query}"

    def start(self, timeout: float = 10.0) -> int:
        """Listen and serve; return the bound port.

        Raises:
            ConfigError: the address cannot be bound.
        """
        loop_thread = self._loop_thread = LoopThread("stamen-dashboard")
        loop_thread.start(timeout)
        try:
            self.port = loop_thread.run(self._start(), timeout)
        except BaseException:
            loop_thread.stop()
            raise
        self._unwatch = self.state.watch(self._wake_threadsafe)
        return self.port

    async def _start(self) -> int:
        self._stopping = asyncio.Event()
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self._port, backlog=64, limit=_MAX_HEAD
            )
        except OSError as exc:
            raise ConfigError(
                f"dashboard_address: cannot listen on {self.host}:{self._port}: {exc}"
            ) from exc
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, end every event stream and connection, stop the thread."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        loop_thread = self._loop_thread
        if loop_thread is None:
            return
        if self._server is not None and not loop_thread.loop.is_closed():
            with contextlib.suppress(Exception):
                loop_thread.run(self._stop(), timeout)
        loop_thread.stop(timeout)

    async def _stop(self) -> None:
        assert self._server is not None and self._stopping is not None
        self._server.close()
        self._stopping.set()
        self._wake()
        if self._stream_tasks:  # each sends the last changes and its end
            await asyncio.wait(list(self._stream_tasks), timeout=2.0)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2.0)

    def _wake_threadsafe(self) -> None:
        """The state changed (on a publishing thread): wake the streams, once per turn."""
        if self._wake_pending:
            return
        self._wake_pending = True
        if self._loop_thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
            self._loop_thread.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        for changed in self._changed:
            changed.set()

    # --- connections ---------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        if len(self._connections) >= self._max_connections:
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                b"connection: close\r\nretry-after: 5\r\n\r\n"
            )
            writer.close()  # after the answer is flushed
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.TimeoutError, h11.ProtocolError):
            pass  # a client that hung up, stalled or spoke no HTTP: its connection ends
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("dashboard: a connection failed")
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._stopping is not None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        while not self._stopping.is_set():
            request = await asyncio.wait_for(self._read(reader, conn), self._request_limit)
            if request is None:
                return
            method, target, headers = request
            if method == "GET" and urlsplit(target).path == "/api/events":
                refusal = self._check(target, headers, stream=True)
                if refusal is None:
                    await self._stream(writer, conn)
                    return
                reply = refusal
            else:
                reply = self._check(target, headers) or self._route(method, target)
            await self._send(writer, conn, reply, head_only=method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read(
        self, reader: asyncio.StreamReader, conn: h11.Connection
    ) -> tuple[str, str, dict[str, str]] | None:
        """The next request's method, target and headers; None when the client closed.
        A request with a body is refused (h11 raises)."""
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(8192)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                raise h11.RemoteProtocolError("a request body where none is read")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
                }
                return request.method.decode(), request.target.decode("latin-1"), headers
            else:  # ConnectionClosed, or PAUSED
                return None

    def _check(
        self, target: str, headers: dict[str, str], *, stream: bool = False
    ) -> _Reply | None:
        """The refusal of a request that may not see the dashboard, or None."""
        if stream and len(self._stream_tasks) >= self._max_streams:
            return _plain(503, "too many event streams open", ("retry-after", "5"))
        if self.token is None:
            host = _host_of(headers.get("host", ""))
            if not _is_loopback(host):
                return _plain(403, "this dashboard answers to localhost only")
            return None
        given = parse_qs(urlsplit(target).query).get("token", [""])[0]
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        return _plain(
            401,
            "this dashboard needs its token: open the address the server logged "
            "(http://host:port/?token=...)",
            ("www-authenticate", 'Bearer realm="stamen dashboard"'),
        )

    def _route(self, method: str, target: str) -> _Reply:
        if method not in ("GET", "HEAD"):
            return _plain(405, "Method Not Allowed", ("allow", "GET, HEAD"))
        path = urlsplit(target).path
        if path in ("/", "/index.html"):
            return _Reply(200, self._files["index.html"], "text/html; charset=utf-8")
        if path == "/api/state":
            return _json(self.state.snapshot())
        if path == "/api/history":
            return _json(self.state.history())
        name = path.removeprefix("/static/")
        if path.startswith("/static/") and name in _STATIC:
            return _Reply(200, self._files[name], _STATIC[name])
        return _plain(404, "Not Found")

    async def _send(
        self, writer: asyncio.StreamWriter, conn: h11.Connection, reply: _Reply, *, head_only: bool
    ) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            *_SECURITY_HEADERS,
            *reply.extra,
        ]
        if reply.status >= 400:
            headers.append(("connection", "close"))
        reason = http.HTTPStatus(reply.status).phrase.encode()
        data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
        if not head_only and reply.body:
            data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self._write_limit)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes | None) -> None:
        writer.write(data or b"")
        await asyncio.wait_for(writer.drain(), self._write_limit)

    async def _send_changes(
        self, writer: asyncio.StreamWriter, conn: h11.Connection, sent: tuple[int, int]
    ) -> tuple[int, int]:
        """Send the state and (when it changed) the history, unless neither changed since
        ``sent`` (their versions); return the versions sent."""
        snapshot = self.state.snapshot()
        if (snapshot["version"], snapshot["history_version"]) == sent:
            return sent
        chunk = _event("state", snapshot)
        history_version = sent[1]
        if snapshot["history_version"] != history_version:
            history = self.state.history()
            history_version = history["history_version"]
            chunk += _event("history", history)
        await self._write(writer, conn.send(h11.Data(data=chunk)))
        return snapshot["version"], history_version

    async def _stream(self, writer: asyncio.StreamWriter, conn: h11.Connection) -> None:
        """Server-sent events until the dashboard stops or the client goes."""
        assert self._stopping is not None
        headers: list[tuple[str, str]] = [
            ("content-type", "text/event-stream"),
            *_SECURITY_HEADERS,
            ("connection", "close"),
        ]
        changed = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None
        self._stream_tasks.add(task)
        self._changed.add(changed)
        try:
            await self._write(writer, conn.send(h11.Response(status_code=200, headers=headers)))
            await self._write(writer, conn.send(h11.Data(data=b"retry: 2000\n\n")))
            sent = (-1, -1)
            while True:
                changed.clear()
                sent = await self._send_changes(writer, conn, sent)
                if self._stopping.is_set():
                    break
                await asyncio.sleep(STREAM_INTERVAL)  # at most a few updates a second
                while not changed.is_set() and not self._stopping.is_set():
                    try:
                        await asyncio.wait_for(changed.wait(), self._keepalive)
                    except asyncio.TimeoutError:
                        await self._write(writer, conn.send(h11.Data(data=b": keepalive\n\n")))
            # The run's last events (its end) come just before the dashboard stops: sent above.
            await self._write(writer, conn.send(h11.Data(data=b"event: end\ndata: {}\n\n")))
            await self._write(writer, conn.send(h11.EndOfMessage()))
        finally:
            self._changed.discard(changed)
            self._stream_tasks.discard(task)
