"""Thin grpc.aio servicer for the grpc-bidi ``Join`` stream (Flower-compatible).

One stream is one node. The server speaks first: it writes the node's next instruction,
reads the reply, and repeats. A node that hangs up, or whose stream breaks, is closed and
its in-flight instruction fails at once. Runs on grpc.aio, so a connected node costs a
coroutine, not a thread: there is no ~1000-stream ceiling.

With node authentication, the signed opening of the stream carries the node's ephemeral
session key, the server answers with its own, and every message of the stream, either
way, carries a MAC under the keys they share (:class:`~stamen.protocol.auth.StreamSession`,
docs/security.md): a message that fails its MAC ends the stream with ``UNAUTHENTICATED``.
The node's key is checked again every heartbeat interval and before each instruction, so
a key removed from the authorized keys ends its open streams.

A Stamen node that announces ``stamen-heartbeat`` is told the heartbeat interval and sends
a heartbeat message (:data:`~stamen.wire.HEARTBEAT_MESSAGE`, MACed like any other) every
interval while it works on an instruction. While an instruction is in flight to such a
node, a silence of :attr:`~stamen.protocol.fleet_server.FleetTiming.silence_limit` (no
reply, frame or heartbeat; measured on the fleet's clock) fails the instruction with
``ConnectionLost`` and closes the stream. A Flower node sends none and is not watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grpc

from ...errors import AuthError, ConnectionLost, DecodeError
from ...messages import ReconnectIns
from ...protocol.auth import HEADER_SESSION, StreamSession, decode_session_key
from ...protocol.fleet import FleetError
from ...wire import (
    BIDI_JOIN_METHOD,
    BIDI_METHOD_NAME,
    BIDI_SERVICE_NAME,
    FRAMES_METADATA,
    HEARTBEAT_METADATA,
    is_heartbeat,
)
from .auth import NodeAuthenticator, opening_key_der, still_authorized
from .grpc_rere import metadata_dict
from .handler import Fleet, Node

__all__ = ["bidi_handler"]

logger = logging.getLogger("stamen.server")

SEND_FRAME = 1 << 20
"""Data bytes per frame of an instruction too large for one message. Every node of a
round is sent its model at once, and gRPC holds a few frames of each stream in its
buffers until the node's flow-control window takes them: 1 MiB frames keep that near
3 MiB per node (a 10 x 100 MB round's server peaked 30-40 MB lower than with 4 MiB
frames, in the same time). Instructions that fit in one message are sent whole."""

SEND_WINDOW = 16
"""Frames of large instructions being made and written at once, on every stream of a
server together: each frame is a copy of its part of the model, and gRPC keeps a copy
of its own until the socket takes it, so with every stream writing at once the send
phase held a few MiB per node (50 nodes x 40 MB: 50-57 MB more heap, which the
allocator keeps for the rest of the run). 16 frames: at most 32 MiB with gRPC's copies,
whatever the node count, and no slower: the streams take turns frame by frame, so every
node still has its model at about the same time (bench/HISTORY.md)."""

SEND_PATIENCE = 2.0
"""Seconds a frame's write may hold its place in the window: a node that takes longer
(a slow link, or one that stopped reading) is sent the rest of its instruction outside
the window, a frame at a time as it takes them, so slow nodes never hold up the others'
sends (its frames in memory are then bounded by its own flow control, as without a
window)."""


class _Revoked(Exception):
    """The node's key was removed from the authorized keys while its stream was open."""


async def _watch_key(
    authenticator: NodeAuthenticator,
    key_der: bytes,
    period: float,
    node_cid: str,
    stream: asyncio.Task[Any],
    revoked: list[str],
) -> None:
    """Every ``period`` seconds, check the node's key; end the stream once it is gone."""
    while True:
        await asyncio.sleep(period)
        if not still_authorized(authenticator, key_der):
            revoked.append(f"node {node_cid}: its key is no longer authorized")
            stream.cancel()
            return


async def _watch_silence(
    fleet: Fleet,
    node: Node,
    awaiting: list[bool],
    stream: asyncio.Task[Any],
    silenced: list[str],
) -> None:
    """While ``awaiting[0]`` (an instruction is in flight), end the stream once the node
    has sent nothing for the fleet's silence limit (``node.last_seen``, on its clock)."""
    state = fleet.state
    while True:
        await asyncio.sleep(fleet.timing.liveness_period)
        limit = state.silence_limit_of(node)
        if awaiting[0] and state.clock.monotonic() - node.last_seen > limit:
            silenced.append(f"node {node.cid}: no reply or heartbeat within {limit:g} s")
            stream.cancel()
            return


def _heartbeat_value(seconds: float) -> str:
    """The interval as the ``stamen-heartbeat`` value: a plain decimal number."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".")


async def _write_paced(
    context: grpc.aio.ServicerContext[Any, Any],
    messages: Iterator[bytes],
    window: asyncio.Semaphore,
) -> None:
    """Write the frames of ``messages`` one at a time, each made (copied from the model)
    and written while it holds a place in ``window`` (:data:`SEND_WINDOW`), until a write
    outlasts :data:`SEND_PATIENCE`: the rest go outside the window."""
    paced = True  # holding a place for each frame (False once a write outlasted patience)
    while True:
        if paced:
            await window.acquire()
        try:
            message = next(messages, None)
            if message is None:
                return
            write = asyncio.ensure_future(context.write(message))
            del message  # gRPC has its copy; the frame goes when the write is done
            try:
                if paced:
                    await asyncio.wait({write}, timeout=SEND_PATIENCE)
                    if not write.done():  # a slow node: its place goes to the others
                        paced = False
                        window.release()
                await write
            except asyncio.CancelledError:
                write.cancel()
                raise
        finally:
            if paced:
                window.release()


def bidi_handler(fleet: Fleet) -> grpc.GenericRpcHandler:
    """The generic handler that serves ``/flwr.proto.FlowerService/Join`` for ``fleet``."""
    window = asyncio.Semaphore(SEND_WINDOW)  # every stream's large instructions share it

    async def join(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        _ = request_iterator  # we use the reader/writer API (context.read/context.write)
        if fleet.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        metadata = metadata_dict(context)
        authenticator = fleet.authenticator
        session: StreamSession | None = None
        key_der: bytes | None = None
        try:
            if authenticator is not None:
                # The opening's signed body is the node's session key: bound to its key.
                node_public = decode_session_key(metadata.get(HEADER_SESSION), "node")
                key = fleet.authenticate(BIDI_JOIN_METHOD, node_public, metadata)
                session = StreamSession.for_server(node_public)
                key_der = opening_key_der(metadata)
            else:
                key = fleet.authenticate(BIDI_JOIN_METHOD, b"", metadata)
        except AuthError as exc:
            logger.warning("refused a request to %s: %s", BIDI_JOIN_METHOD, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise
        except FleetError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
            raise
        # A Stamen node asks for frames, saying its message bound; a Flower node does not,
        # and gets whole messages.
        announced = metadata.get(FRAMES_METADATA)
        frames = announced is not None
        plain = announced is not None and announced.isascii() and len(announced) <= 19
        limit = int(announced) if plain and announced is not None and announced.isdigit() else 0
        # A Stamen node that sends heartbeats says so; it is told the interval (an older
        # Stamen node, or a Flower node, sends none and is not watched for silence).
        beats = frames and metadata.get(HEARTBEAT_METADATA) is not None
        initial: list[tuple[str, str]] = []
        if frames:
            initial.append((FRAMES_METADATA, str(fleet.max_message_length)))
        if beats:
            initial.append((HEARTBEAT_METADATA, _heartbeat_value(fleet.timing.heartbeat_interval)))
        if session is not None:
            initial.append((HEADER_SESSION, session.header_value))
        if initial:
            await context.send_initial_metadata(tuple(initial))
        node = fleet.open_node(
            "grpc-bidi", context.peer(), frames=frames, max_message_length=limit, key=key
        )
        watcher: asyncio.Task[None] | None = None
        revoked: list[str] = []
        if authenticator is not None and key_der is not None:
            stream = asyncio.current_task()
            assert stream is not None
            watcher = asyncio.ensure_future(
                _watch_key(
                    authenticator,
                    key_der,
                    fleet.timing.heartbeat_interval,
                    node.cid,
                    stream,
                    revoked,
                )
            )

        silence: asyncio.Task[None] | None = None
        silenced: list[str] = []
        awaiting = [False]
        clock = fleet.state.clock
        if beats:
            stream = asyncio.current_task()
            assert stream is not None
            silence = asyncio.ensure_future(_watch_silence(fleet, node, awaiting, stream, silenced))

        def sealed(message: bytes) -> bytes:
            return message if session is None else session.seal(message)

        def opened(message: bytes) -> bytes | memoryview:
            return message if session is None else session.open(message)

        error: BaseException | None = None
        try:
            while True:
                task = await fleet.next_task(node)
                if (
                    authenticator is not None
                    and key_der is not None
                    and not still_authorized(authenticator, key_der)
                ):
                    raise _Revoked(f"node {node.cid}: its key is no longer authorized")
                large = frames and len(task.payload) > node.frame_size
                if frames:
                    trailer = None if session is None else session.trailer
                    messages = task.payload.messages(node.frame_size, SEND_FRAME, trailer)
                    if large:
                        await _write_paced(context, messages, window)
                    else:
                        await context.write(next(messages))
                    del messages
                else:
                    await context.write(sealed(task.payload.tobytes()))
                task.sent()  # a stream never sends it again: its model may go to disk
                if large:
                    # A large instruction's reply is large too: it waits for its receive
                    # slot before its first frame is read, so the replies waiting their
                    # turn stay with their nodes (each would hold a frame here: fifty
                    # nodes, 200 MB). Not watched for silence meanwhile (it cannot be
                    # read); its turn comes in instruction order, or after the patience.
                    await fleet.take_slot(node, task.seq, None)
                node.last_seen = clock.monotonic()
                awaiting[0] = True
                try:
                    whole = None
                    while whole is None:
                        data = await context.read()
                        if data is grpc.aio.EOF:
                            error = ConnectionLost(f"node {node.cid} closed its stream")
                            return
                        node.last_seen = clock.monotonic()
                        data = opened(data)
                        if frames and is_heartbeat(data):
                            continue  # it is alive and working; nothing else to do
                        # Not watched while the fleet takes it (a receive slot may be a
                        # while coming, and the node cannot write meanwhile).
                        awaiting[0] = False
                        whole = await fleet.assemble(node, task, data)
                        node.last_seen = clock.monotonic()
                        awaiting[0] = whole is None
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
        except AuthError as exc:
            error = exc
            logger.warning("node %s: closing its stream: %s", node.cid, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except _Revoked as exc:
            error = AuthError(str(exc))
            logger.warning("%s; closing its stream", exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except asyncio.CancelledError:
            if silenced and not revoked:
                error = ConnectionLost(silenced[0])
                logger.warning("%s; closing its stream", silenced[0])
                await context.abort(grpc.StatusCode.UNAVAILABLE, silenced[0])
            if not revoked:
                raise
            error = AuthError(revoked[0])
            logger.warning("%s; closing its stream", revoked[0])
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, revoked[0])
        finally:
            for helper in (watcher, silence):
                if helper is not None:
                    helper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await helper
            fleet.close_node(node, error)

    method = grpc.stream_stream_rpc_method_handler(join)
    return grpc.method_handlers_generic_handler(BIDI_SERVICE_NAME, {BIDI_METHOD_NAME: method})
