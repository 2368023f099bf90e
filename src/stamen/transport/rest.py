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
from ..protocol.fleet import ERRORS
from ..wire import REST_CONTENT_TYPE, Verb
from ._tls import client_ssl_context, diagnose_tls
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
    """Sends Fleet requests as ``POST /api/v0/fleet/<verb>`` with protobuf bodies."""

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
        """One POST; HTTP statuses and httpx errors map to Stamen errors."""
        if self._client is None:
            raise ConnectionLost(f"rest: {verb.name} on a closed client")
        where = f"rest {verb.rest_path} at {self._base_url}"
        headers = None
        if self._settings.signer is not None:
            headers = self._settings.signer.headers(f"POST {verb.rest_path}", body, time.time())
        try:
            response = self._client.post(
                verb.rest_path,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=self._settings.connect_timeout),
            )
        except httpx.ConnectError as exc:
            raise self._tls_or(ConnectError(f"{where}: cannot connect: {exc}"), exc) from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"{where}: no response within {timeout:g} s") from exc
        except httpx.TransportError as exc:
            lost = ConnectionLost(f"{where}: {type(exc).__name__}: {exc}")
            raise self._tls_or(lost, exc) from exc
        if response.status_code == 200:
            if len(response.content) > self._max_message_length:
                raise MessageTooLarge(
                    f"{where}: response of {len(response.content)} bytes is over "
                    f"grpc_max_message_length={self._max_message_length}"
                )
            return response.content
        mapped = _BY_HTTP_STATUS.get(response.status_code)
        text = f"{where}: HTTP {response.status_code}: {response.text[:300]}"
        if mapped is not None:
            raise mapped(text)
        if response.status_code >= 500:
            raise ConnectionLost(text)
        raise ProtocolError(text)

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
