"""rest client transport: the Fleet protocol over HTTP POSTs.

Requests go through httpcore's connection pool (the HTTP/1.1 layer under httpx) directly:
a node sends a few fixed POSTs to one server, and httpx's client layers around them (URL
merging, cookies, auth and redirect hooks, header models) took about 40 % of each
request's CPU time, which a round of many small models pays once per request. As with
httpx, connections are kept alive and reused, and the ``HTTP(S)_PROXY``/``NO_PROXY``
environment variables are honoured.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from urllib.parse import urlsplit

import httpcore

from ..errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    StamenError,
    Timeout,
)
from ..net.tls import client_ssl_context, diagnose_tls
from ..protocol.fleet import ERRORS
from ..wire import FLOWER_REST_CONTENT_TYPE, REST_CONTENT_TYPE, FlowerCall, Verb
from .base import TransportSettings
from .fleet import FleetClientTransport
from .flower_fleet import DetectingTransport, FlowerFleetTransport

__all__ = [
    "FlowerRestRequester",
    "RestRequester",
    "env_proxy",
    "rest_base_url",
    "rest_transport",
]

logger = logging.getLogger("stamen.client")

_BY_HTTP_STATUS = {spec.http_status: spec.exception for spec in ERRORS.values()}


def rest_base_url(address: str, *, secure: bool) -> str:
    """``http(s)://host:port``: a bare ``host:port`` is https when ``secure``, else http."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    return f"{'https' if secure else 'http'}://{address}"


_DEFAULT_HEADERS = {"content-type": REST_CONTENT_TYPE, "accept": REST_CONTENT_TYPE}
_MAX_CONNECTIONS = 10
"""Connections a node keeps to its server (its requests and its heartbeats need two)."""
_KEEPALIVE = 5.0
"""Seconds an idle connection is kept for the next request (httpx's default, as before)."""


def env_proxy(base_url: str) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTP(S)_PROXY``, ``ALL_PROXY``,
    unless ``NO_PROXY`` covers its host), or None."""
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class RestRequester:
    """Sends Fleet requests as ``POST /api/v0/stamen/fleet/<verb>`` with protobuf bodies."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._base_url = rest_base_url(settings.address, secure=settings.secure)
        self._max_message_length = settings.max_message_length
        self._pool: httpcore.ConnectionPool | httpcore.HTTPProxy | None = None
        self.foreign_peer: str | None = None
        """``HTTP 404 (...)`` when the server does not serve Stamen's CreateNode path."""

    def open(self) -> None:
        """Create the connection pool (connections are made on the first request)."""
        self.foreign_peer = None
        settings = self._settings
        context = None
        if self._base_url.startswith("https://"):
            context = client_ssl_context(settings.root_certificates, settings.client_certificate)
        proxy = env_proxy(self._base_url)
        if proxy is not None:
            self._pool = httpcore.HTTPProxy(
                proxy_url=proxy,
                ssl_context=context,
                max_connections=_MAX_CONNECTIONS,
                keepalive_expiry=_KEEPALIVE,
            )
        else:
            self._pool = httpcore.ConnectionPool(
                ssl_context=context, max_connections=_MAX_CONNECTIONS, keepalive_expiry=_KEEPALIVE
            )

    def _tls_or(self, error: StamenError, exc: Exception) -> StamenError:
        diagnosis = diagnose_tls(
            self._base_url,
            secure=self._base_url.startswith("https://"),
            root_certificates=self._settings.root_certificates,
            client_certificate=self._settings.client_certificate,
        )
        return error if diagnosis is None else diagnosis

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """One POST; HTTP statuses and transport errors map to Stamen errors.

        The response is read in chunks and refused as soon as it passes
        ``grpc_max_message_length`` (MessageTooLarge) or ``timeout`` seconds after the
        request was sent (Timeout): the HTTP library bounds each read, not the whole
        response, so a server that trickles its body, or never ends it, would otherwise
        hold the node and fill its memory for ever.
        """
        headers = None
        if self._settings.signer is not None:
            headers = self._settings.signer.headers(f"POST {verb.rest_path}", body, time.time())
        status, content, where = self.post(verb.rest_path, body, timeout, headers)
        if status == 200:
            return content
        reason = content[:300].decode("utf-8", errors="replace")
        text = f"{where}: HTTP {status}: {reason}"
        if verb is Verb.CREATE_NODE and status == 404:
            # Registration needs no node id: a 404 means the path is not served.
            self.foreign_peer = f"HTTP 404 ({reason.strip()[:80]})"
            raise ProtocolError(f"{text} (not a Stamen Fleet server)")
        mapped = _BY_HTTP_STATUS.get(status)
        if mapped is not None:
            raise mapped(text)
        if status >= 500:
            raise ConnectionLost(text)
        raise ProtocolError(text)

    def post(
        self, path: str, body: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        """``POST path`` (``headers`` over the default content type and accept): the
        status, the body (bounded, see :meth:`call`) and a description of the request for
        error messages.

        Raises:
            ConnectError, ConnectionLost, Timeout, MessageTooLarge, TLSError.
        """
        pool = self._pool
        if pool is None:
            raise ConnectionLost(f"rest: POST {path} on a closed client")
        where = f"rest {path} at {self._base_url}"
        deadline = time.monotonic() + timeout
        fields = {**_DEFAULT_HEADERS, **(headers or {}), "content-length": str(len(body))}
        timeouts = {
            "connect": self._settings.connect_timeout,
            "read": timeout,
            "write": timeout,
            "pool": timeout,
        }
        try:
            with pool.stream(
                "POST",
                self._base_url + path,
                headers=list(fields.items()),
                content=body,
                extensions={"timeout": timeouts},
            ) as response:
                content = self._read(response, where, timeout, deadline)
        except httpcore.ConnectError as exc:
            raise self._tls_or(ConnectError(f"{where}: cannot connect: {exc}"), exc) from exc
        except httpcore.TimeoutException as exc:
            raise Timeout(f"{where}: no response within {timeout:g} s") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError) as exc:
            lost = ConnectionLost(f"{where}: {type(exc).__name__}: {exc}")
            raise self._tls_or(lost, exc) from exc
        return response.status, content, where

    def _read(
        self, response: httpcore.Response, where: str, timeout: float, deadline: float
    ) -> bytes:
        """The response body, bounded in size and in time."""
        limit = self._max_message_length
        declared = next(
            (v.decode("latin-1") for k, v in response.headers if k.lower() == b"content-length"),
            "",
        )
        if declared.isdigit() and int(declared) > limit:
            raise MessageTooLarge(
                f"{where}: response of {declared} bytes is over grpc_max_message_length={limit}"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_stream():
            size += len(chunk)
            if size > limit:
                raise MessageTooLarge(
                    f"{where}: response of more than {limit} bytes is over "
                    f"grpc_max_message_length={limit}"
                )
            if time.monotonic() > deadline:
                raise Timeout(f"{where}: response not complete within {timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close the connection pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


class FlowerRestRequester:
    """Sends Flower 1.12 Fleet API calls as ``POST /api/v0/fleet/<path>`` with protobuf
    bodies (same TLS settings and bounds as :class:`RestRequester`)."""

    def __init__(self, settings: TransportSettings) -> None:
        self._http = RestRequester(settings)

    def open(self) -> None:
        """Create the connection pool."""
        self._http.open()

    def call(self, call: FlowerCall, body: bytes, timeout: float) -> bytes:
        """One POST; an error status is a ConnectionLost (5xx) or a ProtocolError."""
        headers = {"content-type": FLOWER_REST_CONTENT_TYPE, "accept": FLOWER_REST_CONTENT_TYPE}
        status, content, where = self._http.post(call.rest_path, body, timeout, headers)
        if status == 200:
            return content
        text = f"{where}: HTTP {status}: {content[:300].decode('utf-8', errors='replace')}"
        if status >= 500:
            raise ConnectionLost(text)
        raise ProtocolError(text)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


def _flower_node(settings: TransportSettings) -> FlowerFleetTransport:
    if settings.signer is not None:
        raise ConfigError(
            f"authentication_keys: the server at {settings.address} is a Flower SuperLink on "
            "REST, and Flower 1.12's REST Fleet API has no node authentication; refusing to "
            "connect unauthenticated (use transport='grpc-rere', or no authentication_keys)"
        )
    return FlowerFleetTransport(
        FlowerRestRequester(settings), max_message_length=settings.max_message_length
    )


def rest_transport(settings: TransportSettings) -> DetectingTransport:
    """A rest node transport: Stamen's Fleet protocol, or Flower 1.12's Fleet API when
    the server is a Flower SuperLink."""
    stamen = FleetClientTransport(
        RestRequester(settings),
        max_message_length=settings.max_message_length,
        max_model_bytes=settings.model_bound,
    )
    return DetectingTransport("rest", settings.address, stamen, lambda: _flower_node(settings))
