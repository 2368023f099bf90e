"""rest client transport: the Fleet protocol over HTTP POSTs (httpx)."""

from __future__ import annotations

import ssl

import httpx

from ..errors import ConnectError, ConnectionLost, MessageTooLarge, ProtocolError, Timeout
from ..protocol.fleet import ERRORS
from ..wire import REST_CONTENT_TYPE, Verb
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

    def __init__(
        self,
        base_url: str,
        *,
        max_message_length: int,
        root_certificates: bytes | None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._base_url = base_url
        self._max_message_length = max_message_length
        self._root_certificates = root_certificates
        self._connect_timeout = connect_timeout
        self._client: httpx.Client | None = None

    def open(self) -> None:
        """Create the HTTP client (connections are made on the first request)."""
        verify: ssl.SSLContext | bool = True
        if self._root_certificates is not None:
            verify = ssl.create_default_context(cadata=self._root_certificates.decode("ascii"))
        self._client = httpx.Client(
            base_url=self._base_url,
            verify=verify,
            timeout=httpx.Timeout(30.0, connect=self._connect_timeout),
            headers={"content-type": REST_CONTENT_TYPE, "accept": REST_CONTENT_TYPE},
        )

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """One POST; HTTP statuses and httpx errors map to Stamen errors."""
        if self._client is None:
            raise ConnectionLost(f"rest: {verb.name} on a closed client")
        where = f"rest {verb.rest_path} at {self._base_url}"
        try:
            response = self._client.post(
                verb.rest_path,
                content=body,
                timeout=httpx.Timeout(timeout, connect=self._connect_timeout),
            )
        except httpx.ConnectError as exc:
            raise ConnectError(f"{where}: cannot connect: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise Timeout(f"{where}: no response within {timeout:g} s") from exc
        except httpx.TransportError as exc:
            raise ConnectionLost(f"{where}: {type(exc).__name__}: {exc}") from exc
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


def rest_transport(
    address: str, *, max_message_length: int, root_certificates: bytes | None, secure: bool
) -> FleetClientTransport:
    """A rest node transport."""
    requester = RestRequester(
        rest_base_url(address, secure=secure),
        max_message_length=max_message_length,
        root_certificates=root_certificates,
    )
    return FleetClientTransport(requester, max_message_length=max_message_length)
