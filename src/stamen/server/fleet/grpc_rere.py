"""Thin grpc.aio servicer for the Fleet protocol over unary gRPC calls (grpc-rere)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ...protocol.fleet import ERRORS, FleetError
from ...wire import FLEET_SERVICE_NAME, Verb
from .handler import Fleet

__all__ = ["metadata_dict", "rere_handler"]

Handler = Callable[[bytes, Any], Awaitable[bytes]]


def metadata_dict(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata as a dict."""
    return {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }


def _method(fleet: Fleet, verb: Verb) -> Handler:
    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await fleet.handle(
                verb,
                request,
                "grpc-rere",
                context.peer(),
                method=verb.grpc_method,
                headers=metadata_dict(context),
            )
        except FleetError as exc:
            code = getattr(grpc.StatusCode, ERRORS[exc.kind].grpc_status)
            await context.abort(code, exc.message)
            raise  # abort raises; this line only satisfies type checkers

    return call


def rere_handler(fleet: Fleet) -> grpc.GenericRpcHandler:
    """The generic handler that serves every Fleet verb as a unary-unary gRPC method."""
    methods = {
        verb.method_name: grpc.unary_unary_rpc_method_handler(_method(fleet, verb)) for verb in Verb
    }
    return grpc.method_handlers_generic_handler(FLEET_SERVICE_NAME, methods)
