"""grpc-rere client transport: the Fleet protocol over unary gRPC calls."""

from __future__ import annotations

import time
from typing import Any

import grpc

from ..errors import ConnectionLost, StamenError
from ..protocol.fleet import ERRORS
from ..wire import Verb
from ._errors import map_rpc_error
from .base import TransportSettings
from .fleet import FleetClientTransport
from .grpc_bidi import open_channel

__all__ = ["GrpcRereRequester", "grpc_rere_transport"]

_BY_GRPC_STATUS = {spec.grpc_status: spec.exception for spec in ERRORS.values()}


class GrpcRereRequester:
    """Sends Fleet requests as unary-unary gRPC calls on one channel."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._address = settings.address
        self._channel: grpc.Channel | None = None
        self._methods: dict[Verb, Any] = {}

    def open(self) -> None:
        """Open the channel and wait until it is READY."""
        self._channel = open_channel(self._settings)
        self._methods = {verb: self._channel.unary_unary(verb.grpc_method) for verb in Verb}

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """One unary call; gRPC status codes map to Stamen errors."""
        method = self._methods.get(verb)
        if method is None:
            raise ConnectionLost(f"grpc-rere: {verb.name} on a closed channel")
        metadata = None
        if self._settings.signer is not None:
            headers = self._settings.signer.headers(verb.grpc_method, body, time.time())
            metadata = tuple(headers.items())
        try:
            response: bytes = method(body, timeout=timeout, metadata=metadata)
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


def grpc_rere_transport(settings: TransportSettings) -> FleetClientTransport:
    """A grpc-rere node transport."""
    return FleetClientTransport(
        GrpcRereRequester(settings), max_message_length=settings.max_message_length
    )
