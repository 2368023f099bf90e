"""Thin grpc.aio servicer for the Fleet protocol over unary gRPC calls (grpc-rere).

Nodes make unary calls; the server serves each as a stream-unary method (the same bytes on
the wire), so that it decides what happens before and while the request arrives:

- the call's metadata is checked first (node authentication: an unauthorized key is
  refused before a byte of its message is read, so it costs no memory);
- until its message is in, a call holds its method's size bound of the fleet's budget of
  request bytes (``FleetTiming.max_unverified_bytes``, shared with REST); a call that
  would go over it is refused UNAVAILABLE before its message is read (gRPC buffers at
  most a flow-control window of it, 64 KiB), and once read it holds its own size until
  it is answered;
- the request must arrive whole within :meth:`FleetTiming.deadline_for` the method's size
  bound, however it trickles; past that, the call ends UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from ...protocol.fleet import ERRORS, ErrorKind, FleetError
from ...wire import FLEET_SERVICE_NAME, Verb, frame_size
from .handler import Fleet

__all__ = ["GuardedHandler", "metadata_dict", "rere_handler"]

Behaviour = Callable[[bytes, Any], Awaitable[bytes]]
Precheck = Callable[[Mapping[str, str]], None]

logger = logging.getLogger("stamen.server")

SMALL_REQUEST = 64 * 1024
"""Size bound of a Fleet request that carries no reply (CreateNode, pulls, heartbeats),
for its deadline."""


def metadata_dict(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata as a dict."""
    return {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }


async def abort_with(context: grpc.aio.ServicerContext, exc: FleetError) -> None:
    """End the call with the status of ``exc`` (raises, as ``context.abort`` does)."""
    code = getattr(grpc.StatusCode, ERRORS[exc.kind].grpc_status)
    await context.abort(code, exc.message)


class GuardedHandler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Unary methods of one service, each behind a metadata check and a read deadline.

    Args:
        service: The gRPC service name.
        methods: Method name -> (behaviour, check of the metadata, size bound of its
            request in bytes).
        fleet: Whose timing sets the deadlines.
    """

    def __init__(
        self, service: str, methods: Mapping[str, tuple[Behaviour, Precheck, int]], fleet: Fleet
    ) -> None:
        self._fleet = fleet
        self._methods = {
            f"/{service}/{name}": (behaviour, check, bound)
            for name, (behaviour, check, bound) in methods.items()
        }

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        found = self._methods.get(handler_call_details.method)
        if found is None:
            return None
        behaviour, check, bound = found
        metadata = {
            key: value
            for key, value in (handler_call_details.invocation_metadata or ())
            if isinstance(value, str)
        }
        try:
            check(metadata)
        except FleetError as refusal:
            return grpc.stream_unary_rpc_method_handler(_refuse(refusal))
        return grpc.stream_unary_rpc_method_handler(_read_then(behaviour, bound, self._fleet))


def _refuse(refusal: FleetError) -> Callable[[Any, Any], Awaitable[bytes]]:
    async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> bytes:
        _ = request_iterator  # never read: the refusal costs no body bytes
        await abort_with(context, refusal)
        raise refusal  # abort raises; this line only satisfies type checkers

    return refuse


def _over_budget(fleet: Fleet, bound: int, peer: str) -> FleetError:
    """The refusal of a call whose message would take the fleet over its budget."""
    budget = fleet.unverified
    if budget.should_warn(fleet.loop.time()):
        logger.warning(
            "grpc: refusing a call from %s: requests being received or served hold %d "
            "bytes and its method may send %d, the limit (FleetTiming.max_unverified_bytes) "
            "is %d; %d refused so far",
            peer,
            budget.held,
            bound,
            budget.limit,
            budget.refused,
        )
    return FleetError(
        ErrorKind.UNAVAILABLE,
        "the server is receiving too many requests at once (FleetTiming."
        "max_unverified_bytes); retry later",
    )


def _read_then(
    behaviour: Behaviour, bound: int, fleet: Fleet
) -> Callable[[Any, Any], Awaitable[bytes]]:
    """Read the call's one message within its deadline, then serve it. Until the message
    is in, the call holds its method's size ``bound`` of the fleet's budget (gRPC shows no
    byte before the whole message): a call that would go over it is refused before it is
    read; once read, it holds the message's size until it is answered."""
    deadline = fleet.timing.deadline_for(bound)

    async def call(request_iterator: Any, context: grpc.aio.ServicerContext) -> bytes:
        _ = request_iterator  # we use context.read
        budget = fleet.unverified
        if not budget.take(bound):
            await abort_with(context, _over_budget(fleet, bound, context.peer()))
        held = bound
        try:
            try:
                request = await asyncio.wait_for(context.read(), deadline)
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the request did not arrive within {deadline:g} s (the request deadline)",
                )
                raise
            if request is grpc.aio.EOF or not isinstance(request, bytes):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "expected one request message"
                )
                raise AssertionError("unreachable")  # abort raises
            budget.give(held - len(request))
            held = len(request)
            return await behaviour(request, context)
        finally:
            budget.give(held)

    return call


def _method(fleet: Fleet, verb: Verb) -> Behaviour:
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
            await abort_with(context, exc)
            raise  # abort raises; this line only satisfies type checkers

    return call


def _bound(fleet: Fleet, verb: Verb) -> int:
    if verb is Verb.PUSH:  # a frame, or a whole reply smaller than one
        return frame_size(fleet.max_message_length) + SMALL_REQUEST
    return SMALL_REQUEST


def rere_handler(fleet: Fleet) -> grpc.GenericRpcHandler:
    """The generic handler that serves every Fleet verb as a unary gRPC method."""

    def methods(verb: Verb) -> tuple[Behaviour, Precheck, int]:
        def check(headers: Mapping[str, str]) -> None:
            fleet.precheck(verb.grpc_method, headers)

        return _method(fleet, verb), check, _bound(fleet, verb)

    return GuardedHandler(
        FLEET_SERVICE_NAME, {verb.method_name: methods(verb) for verb in Verb}, fleet
    )
