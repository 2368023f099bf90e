"""rest client transport: the Fleet protocol over HTTP POSTs (httpx)."""

from __future__ import annotations

import ssl
import time

import httpx

from ..errors import (
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    StamenError,
    Timeout,
)
from ..net.tls import client_ssl_context, diagnose_tls
from ..protocol.fleet import ERRORS
from ..wire import REST_CONTENT_TYPE, Verb
from .base import TransportSettings
from .fleet import FleetClientTransport

__all__ = ["RestRequester", "rest_base_url", "rest_transport"]

_BY_HTTP_STATUS = {spec.http_status: spec.exception for spec in ERRORS.values()}


def rest_base_url(address: str, *, secure: bool) -> str:
    """``http(s)://host:port``: a bare ``host:port`` is https when ``secure``, else http."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    return f"{'https' if secure else 'http'}://{address}"


class RestRequester:
    """Sends Fleet requests as ``POST /api/v0/stamen/fleet/<verb>`` with protobuf bodies."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._base_url = rest_base_url(settings.address, secure=settings.secure)
        self._max_message_length = settings.max_message_length
        self._client: httpx.Client | None = None

    def open(self) -> None:
        """Create the HTTP client (connections are made on the first request)."""
        settings = self._settings
        verify: ssl.SSLContext | bool = False
        if self._base_url.startswith("https://"):
            verify = client_ssl_context(settings.root_certificates, settings.client_certificate)
        self._client = httpx.Client(
            base_url=self._base_url,
            verify=verify,
            timeout=httpx.Timeout(30.0, connect=settings.connect_timeout),
            headers={"content-type": REST_CONTENT_TYPE, "accept": REST_CONTENT_TYPE},
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
        """One POST; HTTP statuses and httpx errors map to Stamen errors.

        The response is read in chunks and refused as soon as it passes
        ``grpc_max_message_length`` (MessageTooLarge) or ``timeout`` seconds after the
        request was sent (Timeout): httpx bounds each read, not the whole response, so a
        server that trickles its body, or never ends it, would otherwise hold the node and
        fill its memory for ever.
        """
        if self._client is None:
            raise ConnectionLost(f"rest: {verb.name} on a closed client")
        where = f"rest {verb.rest_path} at {self._base_url}"
        headers = None
        if self._settings.signer is not None:
            headers = self._settings.signer.headers(f"POST {verb.rest_path}", body, time.time())
        deadline = time.monotonic() + timeout
        try:
            with self._client.stream(
                "POST",
                verb.rest_path,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=self._settings.connect_timeout),
            ) as response:
                content = self._read(response, where, timeout, deadline)
        except httpx.ConnectError as exc:
            raise self._tls_or(ConnectError(f"{where}: cannot connect: {exc}"), exc) from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"{where}: no response within {timeout:g} s") from exc
        except httpx.TransportError as exc:
            lost = ConnectionLost(f"{where}: {type(exc).__name__}: {exc}")
            raise self._tls_or(lost, exc) from exc
        if response.status_code == 200:
            return content
        mapped = _BY_HTTP_STATUS.get(response.status_code)
        reason = content[:300].decode("utf-8", errors="replace")
        text = f"{where}: HTTP {response.status_code}: {reason}"
        if mapped is not None:
            raise mapped(text)
        if response.status_code >= 500:
            raise ConnectionLost(text)
        raise ProtocolError(text)

    def _read(self, response: httpx.Response, where: str, timeout: float, deadline: float) -> bytes:
        """The response body, bounded in size and in time."""
        limit = self._max_message_length
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MessageTooLarge(
                f"{where}: response of {declared} bytes is over grpc_max_message_length={limit}"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
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
        """Close the HTTP client."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


def rest_transport(settings: TransportSettings) -> FleetClientTransport:
    """A rest node transport."""
    return FleetClientTransport(
        RestRequester(settings), max_message_length=settings.max_message_length
    )
