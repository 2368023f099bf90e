"""grpc-rere client transport: the Fleet protocol over unary gRPC calls."""

from __future__ import annotations

from typing import Any

import grpc

from ..errors import ConnectionLost, StamenError
from ..protocol.fleet import ERRORS
from ..wire import Verb
from ._errors import map_rpc_error
from ._tls import channel_credentials
from .fleet import FleetClientTransport
from .grpc_bidi import channel_options, wait_until_ready

__all__ = ["GrpcRereRequester", "grpc_rere_transport"]

_BY_GRPC_STATUS = {spec.grpc_status: spec.exception for spec in ERRORS.values()}


class GrpcRereRequester:
    """Sends Fleet requests as unary-unary gRPC calls on one channel."""

    def __init__(
        self,
        address: str,
        *,
        max_message_length: int,
        root_certificates: bytes | None,
        secure: bool,
        connect_timeout: float = 10.0,
    ) -> None:
        self._address = address
        self._max_message_length = max_message_length
        self._root_certificates = root_certificates
        self._secure = secure
        self._connect_timeout = connect_timeout
        self._channel: grpc.Channel | None = None
        self._methods: dict[Verb, Any] = {}

    def open(self) -> None:
        """Open the channel and wait until it is READY."""
        options = channel_options(self._max_message_length)
        if self._secure:
            creds = channel_credentials(self._root_certificates)
            self._channel = grpc.secure_channel(self._address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self._address, options=options)
        wait_until_ready(self._channel, self._address, self._connect_timeout)
        self._methods = {verb: self._channel.unary_unary(verb.grpc_method) for verb in Verb}

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """One unary call; gRPC status codes map to Stamen errors."""
        method = self._methods.get(verb)
        if method is None:
            raise ConnectionLost(f"grpc-rere: {verb.name} on a closed channel")
        try:
            response: bytes = method(body, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            mapped = _BY_GRPC_STATUS.get(code.name) if code is not None else None
            where = f"grpc-rere {verb.method_name} to {self._address}"
            if mapped is not None and code != grpc.StatusCode.UNAVAILABLE:
                raise mapped(f"{where}: {exc.details()}") from exc
            error: StamenError = map_rpc_error(exc, where)
            raise error from exc
        return response

    def close(self) -> None:
        """Close the channel."""
        channel, self._channel = self._channel, None
        self._methods = {}
        if channel is not None:
            channel.close()


def grpc_rere_transport(
    address: str, *, max_message_length: int, root_certificates: bytes | None, secure: bool
) -> FleetClientTransport:
    """A grpc-rere node transport."""
    requester = GrpcRereRequester(
        address,
        max_message_length=max_message_length,
        root_certificates=root_certificates,
        secure=secure,
    )
    return FleetClientTransport(requester, max_message_length=max_message_length)
