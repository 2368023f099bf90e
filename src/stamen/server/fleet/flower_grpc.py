"""Thin grpc.aio servicer of Flower 1.12's Fleet API (``flwr.proto.Fleet``, unary calls).

Served on the gRPC port beside grpc-bidi's ``Join`` and Stamen's ``stamen.v1.Fleet``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ...protocol.fleet import ERRORS, FleetError
from ...wire import FLOWER_FLEET_SERVICE_NAME, FlowerCall
from .flower import FlowerFleet
from .grpc_rere import metadata_dict

__all__ = ["flower_handler"]

Handler = Callable[[bytes, Any], Awaitable[bytes]]


def _method(flower: FlowerFleet, call: FlowerCall) -> Handler:
    async def serve(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            body, metadata = await flower.handle(
                call, request, "grpc-rere", context.peer(), headers=metadata_dict(context)
            )
        except FleetError as exc:
            code = getattr(grpc.StatusCode, ERRORS[exc.kind].grpc_status)
            await context.abort(code, exc.message)
            raise  # abort raises; this line only satisfies type checkers
        if metadata:
            await context.send_initial_metadata(metadata)
        return body

    return serve


def flower_handler(flower: FlowerFleet) -> grpc.GenericRpcHandler:
    """The generic handler that serves every call of ``flwr.proto.Fleet``."""
    methods = {
        call.method_name: grpc.unary_unary_rpc_method_handler(_method(flower, call))
        for call in FlowerCall
    }
    return grpc.method_handlers_generic_handler(FLOWER_FLEET_SERVICE_NAME, methods)
