"""Thin grpc.aio servicer of Flower 1.12's Fleet API (``flwr.proto.Fleet``, unary calls).

Served on the gRPC port beside grpc-bidi's ``Join`` and Stamen's ``stamen.v1.Fleet``,
behind the same metadata check and read deadline (:class:`.grpc_rere.GuardedHandler`).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from ...protocol.fleet import FleetError
from ...wire import FLOWER_FLEET_SERVICE_NAME, FlowerCall
from .flower import FlowerFleet
from .grpc_rere import SMALL_REQUEST, Behaviour, GuardedHandler, Precheck, abort_with, metadata_dict

__all__ = ["flower_handler"]


def _method(flower: FlowerFleet, call: FlowerCall) -> Behaviour:
    async def serve(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            body, metadata = await flower.handle(
                call, request, "grpc-rere", context.peer(), headers=metadata_dict(context)
            )
        except FleetError as exc:
            await abort_with(context, exc)
            raise  # abort raises; this line only satisfies type checkers
        if metadata:
            await context.send_initial_metadata(metadata)
        return body

    return serve


def flower_handler(flower: FlowerFleet) -> grpc.GenericRpcHandler:
    """The generic handler that serves every call of ``flwr.proto.Fleet``."""

    def methods(call: FlowerCall) -> tuple[Behaviour, Precheck, int]:
        def check(headers: Mapping[str, str]) -> None:
            flower.precheck(call, "grpc-rere", headers)

        # Flower nodes send whole messages: a TaskRes may be as large as the limit.
        bound = (
            flower.fleet.max_message_length if call is FlowerCall.PUSH_TASK_RES else SMALL_REQUEST
        )
        return _method(flower, call), check, bound

    return GuardedHandler(
        FLOWER_FLEET_SERVICE_NAME,
        {call.method_name: methods(call) for call in FlowerCall},
        flower.fleet,
    )
