"""The fleet server's async shell: every transport's servicer is a thin adapter over it.

The state of the fleet (nodes, liveness, task assignment, reply reception, the Fleet
protocol's transitions) is :class:`~stamen.protocol.fleet_server.FleetState`, sans-IO.
:class:`Fleet` runs it on the fleet's event loop thread, which owns every mailbox: it
decodes and encodes messages, waits (long-polls, receive slots), and attaches to each node
what only the server has (its client proxy, its wake-up event). grpc-bidi opens a node per
stream; grpc-rere and rest hand each Fleet request to :meth:`Fleet.handle` and map a
:class:`~stamen.protocol.fleet.FleetError` to their own status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ...clock import SystemClock
from ...errors import AuthError, ConnectionLost, DecodeError
from ...messages import DisconnectRes, Reply
from ...ndarrays import Lease
from ...protocol.clock import Clock
from ...protocol.fleet import CreateNodeResponse, ErrorKind, FleetError, PullResponse
from ...protocol.fleet_server import (
    AwaitTask,
    Caller,
    FleetState,
    FleetTiming,
    NodeRecord,
    Reception,
    Respond,
    Step,
)
from ...protocol.mailbox import ReplyUse, Task
from ...wire import FRAMING, Verb, decode_reply
from ...wire import fleet_codec as codec
from ..client_manager import ClientManager
from ..client_proxy import RemoteClientProxy
from ..events import NodeJoined, NodeLeft, RunEvents
from .auth import NodeAuthenticator
from .slots import ReceiveSlots

__all__ = ["RECEIVE_SLOTS", "Fleet", "FleetTiming", "Node", "slot_lease"]

RECEIVE_SLOTS = 1
"""Large (framed) replies received at once; others wait in instruction order."""

_PUSH_SLOT_WAIT = 10.0
"""Seconds a pushed frame waits for a receive slot before it is taken in anyway (a node's
push request must not time out behind a slow neighbour)."""

Node = NodeRecord
"""A connected node, as the servicers see it (its protocol state)."""

_DECODERS: dict[Verb, Callable[[bytes], object]] = {
    Verb.CREATE_NODE: codec.decode_create_node_request,
    Verb.PULL: codec.decode_pull_request,
    Verb.PUSH: codec.decode_push_request,
    Verb.HEARTBEAT: codec.decode_simple_request,
    Verb.DELETE_NODE: codec.decode_simple_request,
}
"""How each Fleet call's request body is decoded (the transitions are the state's)."""


def _encode_response(response: CreateNodeResponse | PullResponse | None) -> bytes:
    if response is None:
        return codec.encode_empty()
    if isinstance(response, CreateNodeResponse):
        return codec.encode_create_node_response(response)
    return codec.encode_pull_response(response)


@dataclass(eq=False)
class _Attachment:
    """What the server attaches to a node: its proxy, and the event its waits wake on."""

    proxy: RemoteClientProxy
    wake: asyncio.Event = field(default_factory=asyncio.Event)


logger = logging.getLogger("stamen.server")


def slot_lease(use: ReplyUse, lease: Lease) -> Lease | None:
    """The lease whose release gives back the receive slot of a reply received under
    ``lease``: ``lease`` itself, handed on, when the server folds and drops the reply and
    it lies in buffers of ours; None (give the slot back now) otherwise."""
    if use is ReplyUse.FOLDED and lease.buffers:
        return lease.transfer()
    return None


class Fleet:
    """Registry of connected nodes, shared by every transport (see the module docstring)."""

    def __init__(
        self,
        client_manager: ClientManager,
        loop: asyncio.AbstractEventLoop,
        *,
        max_message_length: int,
        timing: FleetTiming | None = None,
        authenticator: NodeAuthenticator | None = None,
        clock: Clock | None = None,
        events: RunEvents | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.events = events if events is not None else RunEvents()
        """Where nodes coming and going are published (the server's run events)."""
        self._client_manager = client_manager
        self._loop = loop
        self.slots = ReceiveSlots(RECEIVE_SLOTS)
        self._attached: dict[str, _Attachment] = {}
        self.state = FleetState(
            clock=clock or SystemClock(),
            framing=FRAMING,
            max_message_length=max_message_length,
            timing=timing,
            events=self,
        )

    def __len__(self) -> int:
        return len(self.state)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the Fleet runs on."""
        return self._loop

    @property
    def timing(self) -> FleetTiming:
        """Heartbeat and long-poll timing of pull-based nodes."""
        return self.state.timing

    @property
    def max_message_length(self) -> int:
        """The server's bound of one message."""
        return self.state.max_message_length

    @property
    def closing(self) -> bool:
        """True once the server is shutting down."""
        return self.state.closing

    # --- nodes -------------------------------------------------------------------------

    def joined(self, node: Node) -> None:
        """A node was registered: give it a proxy in the client manager."""
        proxy = RemoteClientProxy(
            node.cid,
            node.mailbox,
            self._loop,
            max_message_length=node.max_message_length,
            frames=node.frames,
            slots=self.slots,
        )
        attachment = _Attachment(proxy)
        node.mailbox.set_wakeup(attachment.wake.set)
        self._attached[node.cid] = attachment
        self._client_manager.register(proxy)
        self.events.publish(NodeJoined(node.cid, node.transport, node.peer))

    def left(self, node: Node, error: BaseException | None) -> None:
        """A node was removed: drop its proxy, its slot, and wake what waits on it."""
        attachment = self._attached.pop(node.cid, None)
        if attachment is not None:
            self._client_manager.unregister(attachment.proxy)
            attachment.wake.set()
        self.release_slot(node)
        self.events.publish(NodeLeft(node.cid, None if error is None else str(error)))

    def proxy(self, node: Node) -> RemoteClientProxy:
        """The client proxy of a connected node."""
        return self._attached[node.cid].proxy

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
        frames: bool = False,
        max_message_length: int = 0,
        key: str | None = None,
    ) -> Node:
        """Register a stream node (grpc-bidi) and make it available to the server's
        rounds; see :meth:`FleetState.open`."""
        return self.state.open(
            transport, peer, frames=frames, max_message_length=max_message_length, key=key
        )

    async def next_task(self, node: Node) -> Task:
        """Wait for the node's next instruction."""
        while True:
            task = node.mailbox.take()
            if task is not None:
                return task
            attachment = self._attached.get(node.cid)
            if node.mailbox.closed or attachment is None:
                raise ConnectionLost(f"node {node.cid} is closed")
            attachment.wake.clear()
            await attachment.wake.wait()

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
        :class:`~stamen.protocol.mailbox.ReplyUse`) says when its slot comes back: now for a
        reply kept until the round ends; for one folded and dropped at once (streaming
        aggregation), when its buffer is freed (or kept as the running mean), so received
        models cannot pile up ahead of the folding."""
        task = node.mailbox.in_flight(task_id)
        held = None
        if node.slot and task is not None:  # the fleet received it: the lease is its own
            held = slot_lease(task.replies, Lease.over([whole]))
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
        """Take one pushed message of the reply to task ``task_id``: a whole reply or a
        frame of one. Returns the reply once it is whole (and delivers it), else None.

        Raises:
            DecodeError: the bytes are not a valid reply or frame (the task fails with it).
        """
        step = self.state.reception(node, task_id, data)
        if step is Reception.IGNORE:
            logger.info("node %s: frame of ended task %d ignored", node.cid, task_id)
            return None
        if step is Reception.LATE:
            return self.deliver(node, task_id, data)  # decoded, checked, discarded
        task = node.mailbox.in_flight(task_id)
        if step is Reception.NEEDS_SLOT:
            await self.take_slot(node, task.seq if task is not None else 0, _PUSH_SLOT_WAIT)
        whole = self.feed(node, task_id, data)
        return None if whole is None else self.deliver(node, task_id, whole)

    async def assemble(self, node: Node, task: Task, data: bytes) -> bytes | memoryview | None:
        """Take one message read from a stream node for ``task``: the whole reply once
        it is complete, else None. The first frame of a large reply waits for a receive
        slot before its buffer is allocated; the slot then goes with the whole reply (see
        :meth:`pass_slot`).

        Raises:
            DecodeError: malformed or out-of-order frames (the task fails with it).
        """
        if self.state.stream_reception(node, data) is Reception.NEEDS_SLOT:
            await self.take_slot(node, task.seq, None)
        return self.feed(node, task.task_id, data)

    def feed(self, node: Node, task_id: int, data: bytes | memoryview) -> bytes | memoryview | None:
        """Feed one message to the node's reader; the whole reply once complete.

        Raises:
            DecodeError: malformed or out-of-order frames (the task fails with it).
        """
        try:
            whole = node.reader.feed(data)
        except DecodeError as exc:
            self.release_slot(node)
            self.state.fail(node, task_id, exc)
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
            self.state.fail(node, task_id, exc)
            raise
        if not self.state.deliver(node, task_id, reply):
            logger.info("node %s: late reply to task %d discarded", node.cid, task_id)
        return reply

    def close_node(self, node: Node, error: BaseException | None = None) -> None:
        """Remove the node: fail its tasks and drop it from the client manager."""
        self.state.close(node, error)

    def close_all(self, reason: str) -> None:
        """Close every node (server shutdown)."""
        self.state.close_all(reason)

    def drop_silent_nodes(self) -> int:
        """Close pull-based nodes silent for longer than the heartbeat timeout."""
        silent = self.state.silent()
        now = self.state.clock.monotonic()
        for node in silent:
            limit = self.state.silence_limit_of(node)
            logger.warning(
                "node %s: silent for %.1f s; dropping it", node.cid, now - node.last_seen
            )
            self.close_node(
                node, ConnectionLost(f"node {node.cid}: no heartbeat within {limit:g} s")
            )
        return len(silent)

    async def watch_liveness(self) -> None:
        """Run :meth:`drop_silent_nodes` periodically (a task on the fleet loop)."""
        while True:
            await asyncio.sleep(self.timing.liveness_period)
            self.drop_silent_nodes()

    # --- Fleet protocol (grpc-rere, rest) ----------------------------------------------

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
        caller = Caller(transport, peer, self.authenticate(method, body, headers))
        try:
            step = self.state.request(verb.name, _DECODERS[verb](body), caller)
            return await self._perform(step)
        except DecodeError as exc:
            raise FleetError.from_decode(exc) from exc

    async def _perform(self, step: Step) -> bytes:
        """Do what a transition asked: respond, long-poll, or take a reply."""
        if isinstance(step, Respond):
            return _encode_response(step.response)
        if isinstance(step, AwaitTask):
            return _encode_response(await self._long_poll(step))
        reply = await self.receive(step.node, step.task_id, step.data)
        if isinstance(reply, DisconnectRes):
            self.close_node(step.node, None)  # it acknowledged the end of its session
        return codec.encode_empty()

    async def _long_poll(self, step: AwaitTask) -> PullResponse:
        node = step.node
        try:
            task = await asyncio.wait_for(self.next_task(node), step.timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            task = None
        except ConnectionLost as exc:
            raise FleetError(ErrorKind.UNKNOWN_NODE, str(exc)) from exc
        finally:
            self.state.poll_ended(node)
        return self.state.pull_response(node, task)
