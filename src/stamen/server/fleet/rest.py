"""Thin Starlette app for the Fleet protocol over HTTP (rest), served by uvicorn.

``POST /api/v0/fleet/<verb>`` with an ``application/protobuf`` body; the response is the
protobuf response, or an error status with a ``text/plain`` reason. The app runs on the
fleet's own event loop, beside the gRPC server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...errors import ConfigError
from ...protocol.fleet import ERRORS, ErrorKind, FleetError
from ...wire import REST_CONTENT_TYPE, Verb
from .handler import Fleet

__all__ = ["RestListener", "body_idle_limit", "rest_app"]

logger = logging.getLogger("stamen.server")


def _error(kind: ErrorKind, message: str) -> Response:
    return PlainTextResponse(message, status_code=ERRORS[kind].http_status)


async def _read_body(request: Request, limit: int, idle: float) -> bytes:
    """The request's body, at most ``limit`` bytes; a body that sends nothing for ``idle``
    seconds is given up (a stalled or hostile client would otherwise hold its
    connection, and the task reading it, for ever: uvicorn bounds no body read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FleetError(
            ErrorKind.TOO_LARGE, f"body of {declared} bytes is over the limit of {limit}"
        )
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), idle)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                raise FleetError(
                    ErrorKind.UNAVAILABLE,
                    f"the body stalled: nothing for {idle:g} s after {size} bytes",
                ) from None
            size += len(chunk)
            if size > limit:
                raise FleetError(ErrorKind.TOO_LARGE, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        # Not an application error: without this, every node (or anyone) that hangs up
        # mid-body makes uvicorn log "Exception in ASGI application" with a traceback.
        raise FleetError(
            ErrorKind.INVALID_ARGUMENT, f"the client hung up after {size} bytes of the body"
        ) from exc
    return b"".join(chunks)


_MIN_BODY_IDLE = 5.0


def body_idle_limit(fleet: Fleet) -> float:
    """Seconds a request body may send nothing before it is given up: as long as a silent
    node is tolerated (the heartbeat timeout), and at least 5 s."""
    return max(fleet.timing.silence_limit, _MIN_BODY_IDLE)


def rest_app(fleet: Fleet, max_body: int) -> Starlette:
    """The Starlette application serving ``fleet``."""

    def endpoint(verb: Verb) -> Any:
        async def serve(request: Request) -> Response:
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            if content_type != REST_CONTENT_TYPE:
                return PlainTextResponse(
                    f"content-type: expected {REST_CONTENT_TYPE}, received {content_type!r}",
                    status_code=415,
                )
            peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
            try:
                body = await _read_body(request, max_body, body_idle_limit(fleet))
                out = await fleet.handle(
                    verb,
                    body,
                    "rest",
                    peer,
                    method=f"POST {verb.rest_path}",
                    headers=request.headers,
                )
            except FleetError as exc:
                return _error(exc.kind, exc.message)
            return Response(out, media_type=REST_CONTENT_TYPE)

        return serve

    routes = [Route(verb.rest_path, endpoint(verb), methods=["POST"]) for verb in Verb]
    return Starlette(routes=routes)


class _HeadersOnTime(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline on each request's headers.

    uvicorn bounds the wait between requests (its keep-alive timeout), not the headers of
    a request once its first bytes have come: a client that starts a request and stops
    would hold its connection (a file descriptor) for ever. Here each request's headers
    must be complete within ``header_limit`` seconds of the connection opening or of the
    previous response; otherwise the connection is closed.
    """

    header_limit = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._begun = False  # no byte of the next request yet
        self._headers_due = self.loop.call_later(self.header_limit, self._headers_late)

    def data_received(self, data: bytes) -> None:
        self._begun = True
        super().data_received(data)

    def _disarm(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_late(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            # An idle kept-alive connection is routine; a request cut short is not.
            log = logger.warning if self._begun else logger.debug
            log(
                "rest: closing a connection from %s: no complete request headers within %g s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                self.header_limit,
            )
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers were parsed: it is being served
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request's headers are due in turn
        super().on_response_complete()  # parses a pipelined request at once, if any

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class RestListener:
    """uvicorn serving :func:`rest_app` on a socket we bind (so port 0 works)."""

    def __init__(
        self,
        fleet: Fleet,
        address: tuple[str, int],
        *,
        max_body: int,
        ssl_files: tuple[str, str, str] | None = None,
        require_client_certificate: bool = False,
    ) -> None:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it every response waits ~40 ms for a delayed ACK (Nagle).
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ConfigError(
                f"rest_address: cannot listen on {host}:{port} ({exc.strerror})"
            ) from exc
        self.port = int(self._socket.getsockname()[1])
        kwargs: dict[str, Any] = {}
        if ssl_files is not None:
            ca, cert, key = ssl_files
            kwargs = {"ssl_ca_certs": ca, "ssl_certfile": cert, "ssl_keyfile": key}
            if require_client_certificate:
                kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        # Headers get as long as a body may stay silent (the heartbeat timeout, >= 5 s).
        limit = body_idle_limit(fleet)
        protocol = type("HeadersOnTime", (_HeadersOnTime,), {"header_limit": limit})
        self._config = uvicorn.Config(
            rest_app(fleet, max_body),
            http=protocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            **kwargs,
        )
        self._server = uvicorn.Server(self._config)
        self._main: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving (on the running loop)."""
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[self._socket])
        self._main = asyncio.create_task(self._server.main_loop())

    async def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.should_exit = True
        if self._main is not None:
            await self._main
            await self._server.shutdown(sockets=[self._socket])
        self._socket.close()
