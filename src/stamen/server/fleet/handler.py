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
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ...clock import SystemClock
from ...errors import AuthError, ConnectionLost, DecodeError
from ...memory import physical_memory_bytes
from ...messages import (
    DisconnectRes,
    EvaluateIns,
    FitIns,
    GetParametersIns,
    Instruction,
    Reply,
)
from ...ndarrays import Lease
from ...protocol.budget import ByteBudget
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
from ...protocol.slots import Admission
from ...wire import FRAMING, Verb, decode_reply
from ...wire import fleet_codec as codec
from ...wire.codec import DEFAULT_REPLY_LIMITS, ReplyLimits
from ..client_manager import ClientManager
from ..client_proxy import RemoteClientProxy
from ..events import NodeJoined, NodeLeft, RunEvents
from ..spill import receive_buffer
from .auth import NodeAuthenticator
from .slots import ReceiveSlots

__all__ = [
    "RECEIVE_SLOTS",
    "Fleet",
    "FleetTiming",
    "Node",
    "TokenBuckets",
    "peer_host",
    "reply_limits",
    "reply_size_limit",
    "slot_lease",
]

RECEIVE_SLOTS = 1
"""Large (framed) replies received at once; others wait in instruction order."""

_PUSH_SLOT_WAIT = 10.0
"""Seconds a pushed frame waits for a receive slot before it is taken in anyway (a node's
push request must not time out behind a slow neighbour)."""

_FRAME_ORDER_WAIT = 10.0
"""Seconds a pushed frame that came before an earlier frame of its reply waits for it
(nodes push a large reply's frames a few at a time); then it is taken as it is (a gap is
an error)."""

_FRAMES_WAITING = 4
"""Pushed frames of one node that may wait for an earlier one at once; more are taken as
they are (each waiting request holds its bytes of the fleet's request budget)."""

Node = NodeRecord
"""A connected node, as the servicers see it (its protocol state)."""

DECODE_OFF_LOOP = 16 * 1024
"""Replies (and requests) larger than this are decoded on a worker thread, not on the
event loop every transport shares: the loop never spends more than a few milliseconds on
one message, whatever it holds. A PushReply laid out as Stamen nodes write it is read on
the loop whatever its size (``fleet_codec.scan_push_request`` walks its three fields and
copies nothing); its reply is then decoded as above."""

TENSOR_SLACK = 2
"""A reply to an instruction carrying a model of ``n`` tensors may hold up to
``TENSOR_SLACK * n + 16`` tensors."""

REPLY_SIZE_SLACK = 8
"""A framed reply to an instruction carrying ``b`` bytes of model may announce up to
``REPLY_SIZE_SLACK * b`` bytes plus ``max_message_length`` (every dtype widening up to 8
bytes per number fits)."""

MIN_FRAME = 64 * 1024
"""Frames but a message's last carry at least this many bytes (or the link's frame size,
if smaller, halved)."""


def peer_host(peer: str) -> str:
    """The IP address of a transport's peer string (gRPC's ``ipv4:1.2.3.4:5``,
    ``ipv6:[::1]:5``, REST's ``1.2.3.4:5``)."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            peer = peer[len(prefix) :]
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    return host.strip("[]")


class TokenBuckets:
    """Token buckets per key and one for everyone: :meth:`take` says whether one more
    event fits. Buckets that refilled are forgotten, so memory follows active peers.

    Args:
        rate: Tokens per second per key (None: no per-key limit).
        burst: Tokens a key's bucket holds.
        global_rate: Tokens per second for all keys together (None: no such limit);
            its bucket holds ten seconds' worth.
        now: The clock (seconds, monotonic).
    """

    def __init__(
        self,
        rate: float | None,
        burst: int,
        global_rate: float | None,
        now: Callable[[], float],
    ) -> None:
        self._rate, self._burst = rate, float(burst)
        self._global_rate = global_rate
        self._global_burst = 10.0 * global_rate if global_rate is not None else 0.0
        self._now = now
        self._buckets: dict[str, tuple[float, float]] = {}
        self._global = (self._global_burst, now())

    @staticmethod
    def _refill(bucket: tuple[float, float], rate: float, burst: float, now: float) -> float:
        tokens, since = bucket
        return min(burst, tokens + (now - since) * rate)

    def take(self, key: str) -> bool:
        """Take a token for ``key``; False if its bucket or the global one is empty."""
        now = self._now()
        if len(self._buckets) > 10_000:
            self._forget(now)
        own = None
        if self._rate is not None:
            bucket = self._buckets.get(key, (self._burst, now))
            own = self._refill(bucket, self._rate, self._burst, now)
            if own < 1.0:
                self._buckets[key] = (own, now)
                return False
        if self._global_rate is not None:
            shared = self._refill(self._global, self._global_rate, self._global_burst, now)
            if shared < 1.0:
                self._global = (shared, now)
                return False
            self._global = (shared - 1.0, now)
        if own is not None:
            self._buckets[key] = (own - 1.0, now)
        return True

    def _forget(self, now: float) -> None:
        assert self._rate is not None
        rate, burst = self._rate, self._burst
        self._buckets = {
            k: b for k, b in self._buckets.items() if self._refill(b, rate, burst, now) < burst
        }


def reply_limits(instruction: Instruction | None) -> ReplyLimits:
    """What a reply to ``instruction`` may hold: as many tensors as its model has (with
    slack) when it carries one; a few when it carries none and expects none; the defaults
    when the layout is unknown (GetParametersIns, an empty model, a late reply)."""
    if isinstance(instruction, FitIns | EvaluateIns) and instruction.parameters.tensors:
        count = len(instruction.parameters.tensors)
        return ReplyLimits(max_tensors=TENSOR_SLACK * count + 16)
    if instruction is None or isinstance(instruction, GetParametersIns | FitIns):
        return DEFAULT_REPLY_LIMITS
    return ReplyLimits(max_tensors=16)


def reply_size_limit(instruction: Instruction, max_message_length: int, ceiling: int) -> int:
    """The largest framed reply to ``instruction`` the server takes: a multiple of the
    model it carries (see :data:`REPLY_SIZE_SLACK`), ``ceiling`` when it carries none."""
    if isinstance(instruction, FitIns | EvaluateIns) and instruction.parameters.tensors:
        model = sum(len(t) for t in instruction.parameters.tensors)
        return min(ceiling, REPLY_SIZE_SLACK * model + max_message_length)
    if isinstance(instruction, GetParametersIns | FitIns):
        return ceiling
    return max_message_length


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


def _spilled_on_arrival(task: Task, slot: Admission | None) -> bool:
    """Whether a framed reply is received straight into a spill file: every reply of a
    round whose results wait on disk, and a reply let in out of its turn
    (:attr:`Admission.LATE`) in a round that folds its replies in instruction order,
    which must wait for the replies before it: on disk, not in a model-sized buffer."""
    return task.replies is ReplyUse.SPILLED or (
        task.replies is ReplyUse.FOLDED and slot is Admission.LATE
    )


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
        self.spill_directory: str | None = None
        """Where results that wait on disk are received (:mod:`..spill`; None: TMPDIR)."""
        self.events = events if events is not None else RunEvents()
        """Where nodes coming and going are published (the server's run events)."""
        self._client_manager = client_manager
        self._loop = loop
        self.slots = ReceiveSlots(RECEIVE_SLOTS)
        self._attached: dict[str, _Attachment] = {}
        self._decoded: dict[str, tuple[bytes | memoryview, Reply | DecodeError]] = {}
        self._landed: dict[str, asyncio.Event] = {}
        """By node: set when a pushed message of its has been taken (frames that came
        before an earlier one wait on it)."""
        self._waiting: dict[str, int] = {}
        """By node: its pushed frames waiting for an earlier one."""
        chosen = timing or FleetTiming()
        self._registrations = TokenBuckets(
            chosen.create_node_rate,
            chosen.create_node_burst,
            chosen.create_node_global_rate,
            loop.time,
        )
        self._refused_registrations = 0
        self._refusal_logged = -math.inf
        self.unverified = ByteBudget(chosen.max_unverified_bytes or max_message_length + (64 << 20))
        """Request bytes being received or served, before they are answered, on every
        listener together (``FleetTiming.max_unverified_bytes``)."""
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

    def admit_registration(self, peer: str) -> None:
        """Refuse a registration over the rate limit of unauthenticated CreateNode
        (:attr:`FleetTiming.create_node_rate`); with node authentication on, none applies.

        Raises:
            FleetError: RATE_LIMITED (gRPC UNAVAILABLE, HTTP 429): the node retries later.
        """
        if self.authenticator is not None:
            return
        host = peer_host(peer)
        if self._registrations.take(host):
            return
        self._refused_registrations += 1
        now = self._loop.time()
        if now - self._refusal_logged >= 10.0:  # one line per 10 s, whatever the flood
            self._refusal_logged = now
            logger.warning(
                "refusing node registrations over the rate limit (%s/s per address, %s/s in "
                "all; %d refused so far, the latest from %s): set FleetTiming("
                "create_node_rate=...) or turn on node authentication",
                self.timing.create_node_rate,
                self.timing.create_node_global_rate,
                self._refused_registrations,
                host,
            )
        raise FleetError(
            ErrorKind.RATE_LIMITED,
            f"too many node registrations: over the server's rate limit "
            f"({self.timing.create_node_rate}/s per address); retry later",
        )

    def precheck(self, method: str, headers: Mapping[str, str]) -> None:
        """Refuse a request whose headers alone show it is not authenticated, before its
        body is read (see :meth:`NodeAuthenticator.precheck`); nothing without node
        authentication.

        Raises:
            FleetError: UNAUTHENTICATED, saying why.
        """
        if self.authenticator is None:
            return
        try:
            self.authenticator.precheck(headers)
        except AuthError as exc:
            logger.warning("refused a request to %s before its body: %s", method, exc)
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
        if node.slot is not None:
            return
        try:
            node.slot = await asyncio.wait_for(self.slots.acquire(seq), wait)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            logger.info("node %s: receiving its reply without waiting for a slot", node.cid)

    def release_slot(self, node: Node) -> None:
        """Give back the node's receive slot, if it holds one."""
        if node.slot is not None:
            admission, node.slot = node.slot, None
            self.slots.release(admission)

    def pass_slot(self, node: Node, task_id: int, whole: bytes | memoryview) -> None:
        """A large reply was received whole. What the server does with it (its task's
        :class:`~stamen.protocol.mailbox.ReplyUse`) says when its slot comes back: now for a
        reply kept until the round ends; for one folded and dropped at once (streaming
        aggregation), when its buffer is freed (or kept as the running mean), so received
        models cannot pile up ahead of the folding; now again for one received into a
        spill file, whose memory is the file's."""
        task = node.mailbox.in_flight(task_id)
        held = None
        if node.slot is not None and task is not None and not _spilled_on_arrival(task, node.slot):
            held = slot_lease(task.replies, Lease.over([whole]))  # received by the fleet
        if held is None or node.slot is None:
            self.release_slot(node)
            return
        admission, node.slot = node.slot, None
        loop, slots = self._loop, self.slots

        def give_back() -> None:  # runs in whichever thread frees (or keeps) the buffer
            with contextlib.suppress(RuntimeError):  # a closed loop: the server has stopped
                loop.call_soon_threadsafe(slots.release, admission)

        held.when_released(give_back)

    async def receive(self, node: Node, task_id: int, data: bytes | memoryview) -> Reply | None:
        """Take one pushed message of the reply to task ``task_id``: a whole reply or a
        frame of one. Returns the reply once it is whole (and delivers it), else None. A
        frame that came before an earlier one of its reply waits for it first (up to
        :data:`_FRAME_ORDER_WAIT`).

        Raises:
            DecodeError: the bytes are not a valid reply or frame (the task fails with it).
        """
        await self._in_turn(node, task_id, data)
        try:
            return await self._take_pushed(node, task_id, data)
        finally:
            self._look_again(node.cid)

    def _look_again(self, cid: str) -> None:
        """The frames of node ``cid`` waiting for an earlier one ask again whether it is
        in (or their task has ended)."""
        landed = self._landed.pop(cid, None)
        if landed is not None:
            landed.set()

    async def _in_turn(self, node: Node, task_id: int, data: bytes | memoryview) -> None:
        """Wait until the frames before ``data`` in its reply have been taken (or the
        task has ended), for :data:`_FRAME_ORDER_WAIT` seconds at most."""
        if not self.state.ahead_of_turn(node, task_id, data):
            return
        cid = node.cid
        if self._waiting.get(cid, 0) >= _FRAMES_WAITING:
            return  # the reader judges it: a gap is an error
        self._waiting[cid] = self._waiting.get(cid, 0) + 1
        deadline = self._loop.time() + _FRAME_ORDER_WAIT
        try:
            while self.state.ahead_of_turn(node, task_id, data):
                landed = self._landed.setdefault(cid, asyncio.Event())
                try:
                    await asyncio.wait_for(landed.wait(), deadline - self._loop.time())
                except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                    return  # the reader judges it: a gap is an error
        finally:
            left = self._waiting.pop(cid) - 1
            if left:
                self._waiting[cid] = left

    async def _take_pushed(
        self, node: Node, task_id: int, data: bytes | memoryview
    ) -> Reply | None:
        step = self.state.reception(node, task_id, data)
        if step is Reception.IGNORE:
            logger.info("node %s: frame of ended task %d ignored", node.cid, task_id)
            return None
        task = node.mailbox.in_flight(task_id)
        if step is Reception.LATE:
            await self.decode_off_loop(node, None, data)
            return self.deliver(node, task_id, data)  # decoded, checked, discarded
        if step is Reception.NEEDS_SLOT:
            await self.take_slot(node, task.seq if task is not None else 0, _PUSH_SLOT_WAIT)
        whole = self.feed(node, task_id, data)
        if whole is None:
            return None
        await self.decode_off_loop(node, task, whole)
        return self.deliver(node, task_id, whole)

    def bound_reader(self, node: Node, task: Task | None) -> None:
        """Bound the framed reply about to come for ``task``: its announced size (see
        :func:`reply_size_limit`) and its frames' (:data:`MIN_FRAME`)."""
        if task is None:
            return
        ceiling = self.timing.max_reply_size or physical_memory_bytes() // 2
        limit = reply_size_limit(task.instruction, self.max_message_length, ceiling)
        allocate = None
        if _spilled_on_arrival(task, node.slot):  # written straight into a spill file
            directory = self.spill_directory
            allocate = functools.partial(receive_buffer, directory=directory)
        node.reader.bound(limit, min(MIN_FRAME, max(1, node.frame_size // 2)), allocate)

    async def decode_off_loop(
        self, node: Node, task: Task | None, data: bytes | memoryview
    ) -> None:
        """Decode a large reply on a worker thread, for :meth:`deliver` to take: a reply
        holding millions of tiny tensors or metrics must not stall the event loop that
        every transport shares."""
        if len(data) <= DECODE_OFF_LOOP:
            return
        limits = reply_limits(task.instruction if task is not None else None)

        def decode() -> Reply | DecodeError:
            try:
                return decode_reply(data, limits)
            except DecodeError as exc:
                return exc

        self._decoded[node.cid] = (data, await self._loop.run_in_executor(None, decode))

    async def assemble(
        self, node: Node, task: Task, data: bytes | memoryview
    ) -> bytes | memoryview | None:
        """Take one message read from a stream node for ``task``: the whole reply once
        it is complete, else None. The first frame of a large reply waits for a receive
        slot before its buffer is allocated; the slot then goes with the whole reply (see
        :meth:`pass_slot`).

        Raises:
            DecodeError: malformed or out-of-order frames (the task fails with it).
        """
        if self.state.stream_reception(node, data) is Reception.NEEDS_SLOT:
            await self.take_slot(node, task.seq, None)
        whole = self.feed(node, task.task_id, data)
        if whole is not None:
            await self.decode_off_loop(node, task, whole)
        return whole

    def feed(self, node: Node, task_id: int, data: bytes | memoryview) -> bytes | memoryview | None:
        """Feed one message to the node's reader; the whole reply once complete.

        Raises:
            DecodeError: malformed or out-of-order frames (the task fails with it).
        """
        task = node.mailbox.in_flight(task_id)
        if not node.reader.in_progress:
            self.bound_reader(node, task)
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
        decoded = self._decoded.pop(node.cid, None)
        try:
            if decoded is not None and decoded[0] is data:  # decoded off the loop
                if isinstance(decoded[1], DecodeError):
                    raise decoded[1]
                reply = decoded[1]
            else:
                task = node.mailbox.in_flight(task_id)
                reply = decode_reply(data, reply_limits(task.instruction if task else None))
        except DecodeError as exc:
            self.state.fail(node, task_id, exc)
            raise
        if not self.state.deliver(node, task_id, reply):
            logger.info("node %s: late reply to task %d discarded", node.cid, task_id)
        return reply

    def close_node(self, node: Node, error: BaseException | None = None) -> None:
        """Remove the node: fail its tasks and drop it from the client manager."""
        self.state.close(node, error)
        self._look_again(node.cid)  # its waiting frames find their task ended

    def close_all(self, reason: str) -> None:
        """Close every node (server shutdown)."""
        self.state.close_all(reason)
        for cid in list(self._landed):
            self._look_again(cid)

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
        if verb is Verb.CREATE_NODE:
            self.admit_registration(peer)
        try:
            # A reply as Stamen nodes send it is read in place; anything else by protobuf.
            request: object = codec.scan_push_request(body) if verb is Verb.PUSH else None
            if request is None and len(body) > DECODE_OFF_LOOP:
                request = await self._loop.run_in_executor(None, _DECODERS[verb], body)
            elif request is None:
                request = _DECODERS[verb](body)
            step = self.state.request(verb.name, request, caller)
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
