"""Thin grpc.aio servicer for the grpc-bidi ``Join`` stream (Flower-compatible).

One stream is one node. The server speaks first: it writes the node's next instruction,
reads the reply, and repeats. A node that hangs up, or whose stream breaks, is closed and
its in-flight instruction fails at once. Runs on grpc.aio, so a connected node costs a
coroutine, not a thread: there is no ~1000-stream ceiling.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from ...errors import ConnectionLost, DecodeError
from ...messages import ReconnectIns
from ...protocol.fleet import FleetError
from ...wire import BIDI_JOIN_METHOD, BIDI_METHOD_NAME, BIDI_SERVICE_NAME, FRAMES_METADATA
from .grpc_rere import metadata_dict
from .handler import Fleet

__all__ = ["bidi_handler"]

logger = logging.getLogger("stamen.server")


def bidi_handler(fleet: Fleet) -> grpc.GenericRpcHandler:
    """The generic handler that serves ``/flwr.proto.FlowerService/Join`` for ``fleet``."""

    async def join(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        _ = request_iterator  # we use the reader/writer API (context.read/context.write)
        if fleet.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        metadata = metadata_dict(context)
        try:
            key = fleet.authenticate(BIDI_JOIN_METHOD, b"", metadata)
        except FleetError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
            raise
        # A Stamen node asks for frames, saying its message bound; a Flower node does not,
        # and gets whole messages.
        announced = metadata.get(FRAMES_METADATA)
        frames = announced is not None
        limit = int(announced) if announced is not None and announced.isdigit() else 0
        if frames:
            await context.send_initial_metadata(((FRAMES_METADATA, str(fleet.max_message_length)),))
        node = fleet.open_node(
            "grpc-bidi", context.peer(), frames=frames, max_message_length=limit, key=key
        )
        error: BaseException | None = None
        try:
            while True:
                task = await fleet.next_task(node)
                if frames:
                    for message in task.payload.messages(node.frame_size):
                        await context.write(message)
                    del message  # the last frame: not kept while the node works
                else:
                    await context.write(task.payload.tobytes())
                try:
                    whole = None
                    while whole is None:
                        data = await context.read()
                        if data is grpc.aio.EOF:
                            error = ConnectionLost(f"node {node.cid} closed its stream")
                            return
                        whole = await fleet.assemble(node, task, data)
                    fleet.deliver(node, task.task_id, whole)
                except DecodeError as exc:
                    error = exc
                    logger.warning("node %s sent an invalid reply: %s", node.cid, exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if isinstance(task.instruction, ReconnectIns):
                    return
                # The next instruction may be a round away: keep nothing of this one (the
                # reply's buffer would otherwise live as long as these names).
                del task, whole, data
        except ConnectionLost as exc:
            error = exc
        finally:
            fleet.close_node(node, error)

    method = grpc.stream_stream_rpc_method_handler(join)
    return grpc.method_handlers_generic_handler(BIDI_SERVICE_NAME, {BIDI_METHOD_NAME: method})
