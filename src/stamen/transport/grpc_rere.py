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
from ..wire import FlowerCall, Verb, flower_codec
from ._errors import map_rpc_error
from .base import TransportSettings
from .fleet import FleetClientTransport
from .flower_fleet import (
    PUBLIC_KEY_HEADER,
    DetectingTransport,
    FlowerFleetTransport,
    FlowerNodeAuth,
)
from .grpc_bidi import open_channel

__all__ = ["FlowerGrpcRequester", "GrpcRereRequester", "grpc_rere_transport"]

_BY_GRPC_STATUS = {spec.grpc_status: spec.exception for spec in ERRORS.values()}

_WAIT_MARGIN = 10.0

_FOREIGN = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN)
"""CreateNode answers that tell the server is not a Stamen Fleet server."""

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
        self.foreign_peer: str | None = None
        """What the server answered to CreateNode if that says it is not a Stamen Fleet
        server: ``UNIMPLEMENTED`` (it does not serve the method), or ``UNKNOWN`` (a Flower
        1.12 SuperLink with node authentication answers so to methods it does not serve)."""

    def open(self) -> None:
        """Open the channel and wait until it is READY."""
        self.foreign_peer = None
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
            if verb is Verb.CREATE_NODE and code in _FOREIGN:
                self.foreign_peer = f"{code.name} ({exc.details()})"
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
        _close_channel(channel, self._address)


def _close_channel(channel: aio.Channel | None, address: str) -> None:
    """Close ``channel`` on the client loop, if there is one (best effort: never raises)."""
    if channel is None:
        return
    try:
        run_on_client_loop(channel.close(), _WAIT_MARGIN)
    except Exception as exc:
        logger.debug("grpc-rere: closing the channel to %s: %s", address, exc)


async def _methods(channel: aio.Channel) -> dict[Verb, Any]:
    """The channel's unary methods (made on the loop they run on)."""
    return {verb: channel.unary_unary(verb.grpc_method) for verb in Verb}


class FlowerGrpcRequester:
    """Sends Flower 1.12 Fleet API calls (``/flwr.proto.Fleet/<Method>``) as unary gRPC
    calls on one ``grpc.aio`` channel, with Flower's node authentication when the node has
    ``authentication_keys``."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._address = settings.address
        self._channel: aio.Channel | None = None
        self._methods: dict[FlowerCall, Any] = {}
        self._auth = FlowerNodeAuth(settings.signer) if settings.signer is not None else None

    def open(self) -> None:
        """Open the channel and wait until it is READY."""
        channel = open_channel(self._settings)
        self._channel = channel
        self._methods = run_on_client_loop(_flower_methods(channel))

    def call(self, call: FlowerCall, body: bytes, timeout: float) -> bytes:
        """One unary call; gRPC status codes map to Stamen errors."""
        method = self._methods.get(call)
        if method is None:
            raise ConnectionLost(f"grpc-rere: Flower {call.method_name} on a closed channel")
        metadata = None
        if self._auth is not None:
            body = flower_codec.deterministic_request(call.method_name, body)
            metadata = self._auth.metadata(call, body)
        return run_on_client_loop(
            self._call(call, method, body, timeout, metadata), timeout + _WAIT_MARGIN
        )

    async def _call(
        self,
        call: FlowerCall,
        method: Any,
        body: bytes,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> bytes:
        try:
            pending = method(body, timeout=timeout, metadata=metadata)
            if self._auth is not None and call is FlowerCall.CREATE_NODE:
                initial = await pending.initial_metadata()
                response: bytes = await pending
                values = [v for k, v in (initial or ()) if k == PUBLIC_KEY_HEADER]
                self._auth.superlink_key(values[0] if values else None)
                return response
            response = await pending
        except grpc.RpcError as exc:
            error: StamenError = map_rpc_error(
                exc, f"grpc-rere Flower {call.method_name} to {self._address}"
            )
            raise error from exc
        return response

    def close(self) -> None:
        """Close the channel. Never raises."""
        channel, self._channel = self._channel, None
        self._methods = {}
        _close_channel(channel, self._address)


async def _flower_methods(channel: aio.Channel) -> dict[FlowerCall, Any]:
    return {call: channel.unary_unary(call.grpc_method) for call in FlowerCall}


def _flower_node(settings: TransportSettings) -> FlowerFleetTransport:
    if settings.signer is not None:
        logger.warning(
            "grpc-rere: authenticating with Flower 1.12's node authentication, which is "
            "weaker than Stamen's: its HMAC has no timestamp or nonce, so a recorded request "
            "can be replayed (see docs/security.md)"
        )
    return FlowerFleetTransport(
        FlowerGrpcRequester(settings), max_message_length=settings.max_message_length
    )


def grpc_rere_transport(settings: TransportSettings) -> DetectingTransport:
    """A grpc-rere node transport: Stamen's Fleet protocol, or Flower 1.12's Fleet API
    when the server is a Flower SuperLink."""
    stamen = FleetClientTransport(
        GrpcRereRequester(settings),
        max_message_length=settings.max_message_length,
        max_model_bytes=settings.model_bound,
    )
    return DetectingTransport("grpc-rere", settings.address, stamen, lambda: _flower_node(settings))
