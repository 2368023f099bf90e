"""grpc-rere client transport: the Fleet protocol over unary gRPC calls."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from grpc import aio

from ..errors import ConnectionLost, StamenError
from ..net.loop import run_on_client_loop
from ..protocol.fleet import ERRORS
from ..wire import Verb
from ._errors import map_rpc_error
from .base import TransportSettings
from .fleet import FleetClientTransport
from .grpc_bidi import open_channel

__all__ = ["GrpcRereRequester", "grpc_rere_transport"]

_BY_GRPC_STATUS = {spec.grpc_status: spec.exception for spec in ERRORS.values()}

_WAIT_MARGIN = 10.0

logger = logging.getLogger("stamen.client")


class GrpcRereRequester:
    """Sends Fleet requests as unary-unary gRPC calls on one channel (``grpc.aio``, on the
    process's client loop: a thread waiting for its long-poll does not wake up ten times
    a second, as with gRPC's synchronous API)."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._address = settings.address
        self._channel: aio.Channel | None = None
        self._methods: dict[Verb, Any] = {}

    def open(self) -> None:
        """Open the channel and wait until it is READY."""
        channel = open_channel(self._settings)
        self._channel = channel
        self._methods = run_on_client_loop(_methods(channel))

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """One unary call; gRPC status codes map to Stamen errors."""
        method = self._methods.get(verb)
        if method is None:
            raise ConnectionLost(f"grpc-rere: {verb.name} on a closed channel")
        metadata = None
        if self._settings.signer is not None:
            headers = self._settings.signer.headers(verb.grpc_method, body, time.time())
            metadata = tuple(headers.items())
        # gRPC's deadline bounds the call; the wait on it gets a margin past that.
        return run_on_client_loop(
            self._call(verb, method, body, timeout, metadata), timeout + _WAIT_MARGIN
        )

    async def _call(
        self,
        verb: Verb,
        method: Any,
        body: bytes,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> bytes:
        try:
            response: bytes = await method(body, timeout=timeout, metadata=metadata)
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
        """Close the channel. Never raises."""
        channel, self._channel = self._channel, None
        self._methods = {}
        if channel is not None:
            try:
                run_on_client_loop(channel.close(), _WAIT_MARGIN)
            except Exception as exc:  # closing is best effort
                logger.debug("grpc-rere: closing the channel to %s: %s", self._address, exc)


async def _methods(channel: aio.Channel) -> dict[Verb, Any]:
    """The channel's unary methods (made on the loop they run on)."""
    return {verb: channel.unary_unary(verb.grpc_method) for verb in Verb}


def grpc_rere_transport(settings: TransportSettings) -> FleetClientTransport:
    """A grpc-rere node transport."""
    return FleetClientTransport(
        GrpcRereRequester(settings), max_message_length=settings.max_message_length
    )
