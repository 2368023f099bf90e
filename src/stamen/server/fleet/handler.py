"""The transport-agnostic side of the fleet: nodes, their mailboxes and proxies.

Every transport's servicer is a thin adapter over :class:`Fleet`. grpc-bidi opens a node
per stream and moves bytes; grpc-rere and rest hand each Fleet request to
:meth:`Fleet.handle` and map a :class:`~stamen.protocol.fleet.FleetError` to their own
status. All of it runs on the fleet's event loop thread, which owns every mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import AuthError, ConnectionLost, DecodeError
from ...messages import DisconnectRes, Reply
from ...ndarrays import Lease
from ...protocol.fleet import (
    PROTOCOL_VERSION,
    CreateNodeResponse,
    ErrorKind,
    FleetError,
    PullResponse,
)
from ...protocol.mailbox import Mailbox, Task
from ...wire import FrameReader, Verb, decode_reply, frame_size
from ...wire import fleet_codec as codec
from ...wire.frames import is_frame, read_frame
from ..client_manager import ClientManager
from ..client_proxy import RemoteClientProxy
from .auth import NodeAuthenticator
from .slots import ReceiveSlots

__all__ = ["RECEIVE_SLOTS", "Fleet", "FleetTiming", "Node"]

RECEIVE_SLOTS = 1
"""Large (framed) replies received at once; others wait in instruction order."""

_PUSH_SLOT_WAIT = 10.0
"""Seconds a pushed frame waits for a receive slot before it is taken in anyway (a node's
push request must not time out behind a slow neighbour)."""

logger = logging.getLogger("stamen.server")


@dataclass(frozen=True)
class FleetTiming:
    """Liveness and long-poll timing of pull-based nodes (grpc-rere, rest).

    Attributes:
        heartbeat_interval: Seconds between a busy node's heartbeats (told to each node).
        heartbeat_timeout: Seconds of silence after which a node is dropped and its
            in-flight instruction fails (default: 3 intervals).
        poll_timeout: Seconds a PullInstruction request is held open when there is no work.
        connection_idle_limit: Seconds a gRPC connection may carry no call before the
            server closes it (default: twice the heartbeat timeout, at least 60 s). Nodes
            always have a call open (a grpc-bidi stream, a grpc-rere long-poll) or make
            one every heartbeat; a connection that is idle longer is abandoned or hostile
            and would otherwise hold a file descriptor for ever. A node whose connection
            was closed opens a new one with its next call.
    """

    heartbeat_interval: float = 15.0
    heartbeat_timeout: float | None = None
    poll_timeout: float = 10.0
    connection_idle_limit: float | None = None

    def __post_init__(self) -> None:
        limit = self.connection_idle_limit
        if limit is not None and not (math.isfinite(limit) and limit > 0):
            raise ValueError(
                f"connection_idle_limit: expected a positive number of seconds, received {limit!r}"
            )

    @property
    def silence_limit(self) -> float:
        """The effective heartbeat timeout."""
        return self.heartbeat_timeout or 3.0 * self.heartbeat_interval

    @property
    def idle_limit(self) -> float:
        """The effective ``connection_idle_limit``."""
        if self.connection_idle_limit is not None:
            return self.connection_idle_limit
        return max(2.0 * self.silence_limit, 60.0)


@dataclass(eq=False)
class Node:
    """One connected client node."""

    cid: str
    node_id: int
    transport: str
    peer: str
    mailbox: Mailbox
    proxy: RemoteClientProxy
    pull_based: bool = False
    frames: bool = False
    key: str | None = None
    last_seen: float = 0.0
    polls: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reader: FrameReader = field(default_factory=FrameReader)
    reading_task: int = 0
    frame_size: int = 0
    slot: bool = False


class Fleet:
    """Registry of connected nodes, shared by every transport."""

    def __init__(
        self,
        client_manager: ClientManager,
        loop: asyncio.AbstractEventLoop,
        *,
        max_message_length: int,
        timing: FleetTiming | None = None,
        authenticator: NodeAuthenticator | None = None,
    ) -> None:
        self.authenticator = authenticator
        self._client_manager = client_manager
        self._loop = loop
        self.max_message_length = max_message_length
        self.timing = timing or FleetTiming()
        self.slots = ReceiveSlots(RECEIVE_SLOTS)
        self._nodes: dict[str, Node] = {}
        self.closing = False

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the Fleet runs on."""
        return self._loop

    # --- nodes -------------------------------------------------------------------------

    def authenticate(self, method: str, body: bytes, headers: Mapping[str, str]) -> str | None:
        """Check a request's signature; return the node key's fingerprint (None: no auth).

        Raises:
            FleetError: UNAUTHENTICATED, saying why.
        """
        if self.authenticator is None:
            return None
        try:
            return self.authenticator.verify(method, body, headers)
        except AuthError as exc:
            logger.warning("refused a request to %s: %s", method, exc)
            raise FleetError(ErrorKind.UNAUTHENTICATED, str(exc)) from exc

    def open_node(
        self,
        transport: str,
        peer: str,
        *,
        pull_based: bool = False,
        frames: bool = False,
        max_message_length: int = 0,
        key: str | None = None,
    ) -> Node:
        """Register a new node and make it available to the server's rounds.

        ``frames``: the node takes messages in frames (every Stamen node; pull-based nodes
        always do). Instructions too large for one message can only go to such nodes.
        ``max_message_length``: the node's own bound (0: unknown), which frames respect.
        """
        frames = frames or pull_based
        limit = self.max_message_length
        if max_message_length > 0:
            limit = min(limit, max_message_length)
        if pull_based:
            node_id = secrets.randbits(63) or 1
            while str(node_id) in self._nodes:
                node_id = secrets.randbits(63) or 1
            cid = str(node_id)
        else:
            node_id, cid = -1, uuid.uuid4().hex
        mailbox = Mailbox(cid)
        proxy = RemoteClientProxy(
            cid,
            mailbox,
            self._loop,
            max_message_length=limit,
            frames=frames,
            slots=self.slots,
        )
        node = Node(
            cid=cid,
            node_id=node_id,
            transport=transport,
            peer=peer,
            mailbox=mailbox,
            proxy=proxy,
            pull_based=pull_based,
            frames=frames,
            frame_size=frame_size(limit),
            key=key,
            last_seen=self._loop.time(),
        )
        mailbox.set_wakeup(node.wake.set)
        self._nodes[cid] = node
        self._client_manager.register(proxy)
        logger.debug("node %s joined over %s from %s", cid, transport, peer)
        return node

    async def next_task(self, node: Node) -> Task:
        """Wait for the node's next instruction."""
        while True:
            task = node.mailbox.take()
            if task is not None:
                return task
            if node.mailbox.closed:
                raise ConnectionLost(f"node {node.cid} is closed")
            node.wake.clear()
            await node.wake.wait()

    async def take_slot(self, node: Node, seq: int, wait: float | None) -> None:
        """Hold a receive slot for the node's incoming reply (see :mod:`.slots`); after
        ``wait`` seconds go on without one."""
        if node.slot:
            return
        try:
            await asyncio.wait_for(self.slots.acquire(seq), wait)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            logger.info("node %s: receiving its reply without waiting for a slot", node.cid)
            return
        node.slot = True

    def release_slot(self, node: Node) -> None:
        """Give back the node's receive slot, if it holds one."""
        if node.slot:
            node.slot = False
            self.slots.release()

    def pass_slot(self, node: Node, task_id: int, whole: bytes | memoryview) -> None:
        """A large reply was received whole. What the server does with it (its task's
        :class:`~stamen.ndarrays.ReplyUse`) says when its slot comes back: now for a
        reply kept until the round ends; for one folded and dropped at once (streaming
        aggregation), when its buffer is freed (or kept as the running mean), so received
        models cannot pile up ahead of the folding."""
        task = node.mailbox.in_flight(task_id)
        held = None
        if node.slot and task is not None:  # the fleet received it: the lease is its own
            held = task.replies.slot_lease(Lease.over([whole]))
        if held is None:
            self.release_slot(node)
            return
        node.slot = False
        loop, slots = self._loop, self.slots

        def give_back() -> None:  # runs in whichever thread frees (or keeps) the buffer
            with contextlib.suppress(RuntimeError):  # a closed loop: the server has stopped
                loop.call_soon_threadsafe(slots.release)

        held.when_released(give_back)

    async def receive(self, node: Node, task_id: int, data: bytes) -> Reply | None:
        """Take one message of the reply to task ``task_id``: a whole reply or a frame of
        one. Returns the reply once it is whole (and delivers it), else None.

        A frame for a task that already ended (sent again after a lost response) is
        ignored; frames of a task the node gave up are dropped with the partial reply.

        Raises:
            DecodeError: the bytes are not a valid reply or frame (the task fails with it).
        """
        if node.reading_task != task_id:
            node.reader.reset()
            node.reading_task = task_id
        task = node.mailbox.in_flight(task_id)
        if not node.reader.in_progress and task is None:
            if read_frame(data) is not None:
                logger.info("node %s: frame of ended task %d ignored", node.cid, task_id)
                return None
            return self.deliver(node, task_id, data)  # late: decoded, checked, discarded
        seq = task.seq if task is not None else 0
        whole = await self.assemble(node, task_id, seq, data, _PUSH_SLOT_WAIT)
        return None if whole is None else self.deliver(node, task_id, whole)

    async def assemble(
        self, node: Node, task_id: int, seq: int, data: bytes, wait: float | None
    ) -> bytes | memoryview | None:
        """Take one received message of the reply to task ``task_id`` (instruction
        ``seq``): the whole reply once it is complete, else None. The first frame of a
        large reply waits for a receive slot (at most ``wait`` seconds) before its buffer
        is allocated; the slot then goes with the whole reply (see :meth:`pass_slot`).

        Raises:
            DecodeError: malformed or out-of-order frames (the task fails with it).
        """
        if not node.reader.in_progress and is_frame(data):
            await self.take_slot(node, seq, wait)
        try:
            whole = node.reader.feed(data)
        except DecodeError as exc:
            self.release_slot(node)
            node.mailbox.fail(task_id, exc)
            raise
        if whole is not None:
            self.pass_slot(node, task_id, whole)
        return whole

    def deliver(self, node: Node, task_id: int, data: bytes | memoryview) -> Reply:
        """Decode reply bytes for task ``task_id`` and resolve it.

        Raises:
            DecodeError: the bytes are not a valid reply (the task fails with it too).
        """
        try:
            reply = decode_reply(data)
        except DecodeError as exc:
            node.mailbox.fail(task_id, exc)
            raise
        if not node.mailbox.deliver(task_id, reply):
            logger.info("node %s: late reply to task %d discarded", node.cid, task_id)
        return reply

    def close_node(self, node: Node, error: BaseException | None = None) -> None:
        """Remove the node: fail its tasks and drop it from the client manager."""
        if self._nodes.pop(node.cid, None) is None:
            return
        self._client_manager.unregister(node.proxy)
        self.release_slot(node)
        node.mailbox.close(error)
        node.wake.set()
        logger.debug("node %s left: %s", node.cid, error)

    def close_all(self, reason: str) -> None:
        """Close every node (server shutdown)."""
        self.closing = True
        for node in list(self._nodes.values()):
            self.close_node(node, ConnectionLost(f"node {node.cid}: {reason}"))

    def drop_silent_nodes(self) -> int:
        """Close pull-based nodes silent for longer than the heartbeat timeout."""
        now, limit = self._loop.time(), self.timing.silence_limit
        dropped = 0
        for node in list(self._nodes.values()):
            if node.pull_based and node.polls == 0 and now - node.last_seen > limit:
                logger.warning(
                    "node %s: silent for %.1f s; dropping it", node.cid, now - node.last_seen
                )
                self.close_node(
                    node, ConnectionLost(f"node {node.cid}: no heartbeat within {limit:g} s")
                )
                dropped += 1
        return dropped

    async def watch_liveness(self) -> None:
        """Run :meth:`drop_silent_nodes` periodically (a task on the fleet loop)."""
        period = max(0.01, min(self.timing.heartbeat_interval, self.timing.silence_limit) / 2)
        while True:
            await asyncio.sleep(period)
            self.drop_silent_nodes()

    # --- Fleet protocol (grpc-rere, rest) ----------------------------------------------

    def _check_version(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise FleetError(
                ErrorKind.VERSION_MISMATCH,
                f"Fleet protocol version: expected {PROTOCOL_VERSION}, received {version} "
                "(upgrade the node or the server so both speak the same version)",
            )

    def _lookup(self, node_id: int, version: int, key: str | None) -> Node:
        self._check_version(version)
        node = self._nodes.get(str(node_id))
        if node is None or not node.pull_based:
            raise FleetError(ErrorKind.UNKNOWN_NODE, f"node {node_id} is not registered")
        if node.key != key:
            raise FleetError(ErrorKind.UNAUTHENTICATED, f"node {node_id} belongs to another key")
        node.last_seen = self._loop.time()
        return node

    async def handle(
        self,
        verb: Verb,
        body: bytes,
        transport: str,
        peer: str,
        *,
        method: str,
        headers: Mapping[str, str],
    ) -> bytes:
        """Serve one Fleet request; return the response body.

        ``method`` is the request as the transport names it (gRPC method path or
        ``POST <path>``), ``headers`` its metadata: together they are what a node's
        signature covers.

        Raises:
            FleetError: the request is refused; the adapter maps its kind to a status.
        """
        if self.closing:
            raise FleetError(ErrorKind.UNAVAILABLE, "server is shutting down")
        if len(body) > self.max_message_length:
            raise FleetError(
                ErrorKind.TOO_LARGE,
                f"request of {len(body)} bytes is over the server's max message length "
                f"{self.max_message_length}",
            )
        key = self.authenticate(method, body, headers)
        try:
            return await self._handle(verb, body, transport, peer, key)
        except DecodeError as exc:
            raise FleetError.from_decode(exc) from exc

    async def _handle(
        self, verb: Verb, body: bytes, transport: str, peer: str, key: str | None
    ) -> bytes:
        if verb is Verb.CREATE_NODE:
            create = codec.decode_create_node_request(body)
            self._check_version(create.protocol_version)
            node = self.open_node(
                transport,
                peer,
                pull_based=True,
                max_message_length=create.max_message_length,
                key=key,
            )
            timing = self.timing
            return codec.encode_create_node_response(
                CreateNodeResponse(
                    node.node_id,
                    timing.heartbeat_interval,
                    timing.poll_timeout,
                    self.max_message_length,
                )
            )
        if verb is Verb.PULL:
            pull = codec.decode_pull_request(body)
            node = self._lookup(pull.node_id, pull.protocol_version, key)
            if pull.task_id:
                task = node.mailbox.in_flight(pull.task_id)
                if task is not None and 0 < pull.offset < len(task.payload):
                    frame = task.payload.frame(pull.offset, node.frame_size)
                    return codec.encode_pull_response(PullResponse(task.task_id, frame))
            return await self._pull(node)
        if verb is Verb.PUSH:
            push = codec.decode_push_request(body)
            node = self._lookup(push.node_id, push.protocol_version, key)
            reply = await self.receive(node, push.task_id, push.client_message)
            if isinstance(reply, DisconnectRes):
                self.close_node(node, None)  # it acknowledged the end of its session
            return codec.encode_empty()
        if verb is Verb.HEARTBEAT:
            beat = codec.decode_simple_request(body)
            self._lookup(beat.node_id, beat.protocol_version, key)
            return codec.encode_empty()
        if verb is Verb.DELETE_NODE:
            gone = codec.decode_simple_request(body)
            self._check_version(gone.protocol_version)
            node_or_none = self._nodes.get(str(gone.node_id))
            if node_or_none is not None and node_or_none.pull_based and node_or_none.key == key:
                self.close_node(node_or_none, ConnectionLost(f"node {gone.node_id} left"))
            return codec.encode_empty()
        raise FleetError(ErrorKind.INVALID_ARGUMENT, f"unknown Fleet verb {verb!r}")

    async def _pull(self, node: Node) -> bytes:
        node.polls += 1
        try:
            task = await asyncio.wait_for(self.next_task(node), self.timing.poll_timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            return codec.encode_pull_response(PullResponse(0, b""))
        except ConnectionLost as exc:
            raise FleetError(ErrorKind.UNKNOWN_NODE, str(exc)) from exc
        finally:
            node.polls -= 1
            node.last_seen = self._loop.time()
        payload = task.payload
        if len(payload) <= node.frame_size:
            message = payload.tobytes()
        else:
            message = payload.frame(0, node.frame_size)
        return codec.encode_pull_response(PullResponse(task.task_id, message))
