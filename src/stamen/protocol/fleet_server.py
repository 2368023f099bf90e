"""The fleet server's state, sans-IO: nodes, liveness, task assignment, reply reception.

Every transport's server is an async shell over one :class:`FleetState`: grpc-bidi opens a
node per stream; grpc-rere and rest turn each Fleet request into a call of
:meth:`FleetState.request`, whose answer is a :class:`Step` (data) that says what the
shell must do: send a response, wait for the node's next task, or take a reply. The
shell moves bytes, waits and decodes; the state decides. Nothing here reads a clock of its
own (time comes from the injected :class:`~stamen.protocol.clock.Clock`), opens a socket
or waits, so the whole table runs under a fake clock in tests.

One table, :data:`TRANSITIONS`, maps each Fleet call to the method that serves it.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TypeVar

from ..errors import ConnectionLost
from ..messages import Reply
from .clock import Clock
from .fleet import (
    PROTOCOL_VERSION,
    CreateNodeRequest,
    CreateNodeResponse,
    ErrorKind,
    FleetError,
    PullRequest,
    PullResponse,
    PushRequest,
    SimpleRequest,
)
from .mailbox import Mailbox, Task
from .slots import Admission

__all__ = [
    "TRANSITIONS",
    "AwaitTask",
    "Caller",
    "FleetEvents",
    "FleetState",
    "FleetTiming",
    "Framing",
    "NodeRecord",
    "Reception",
    "Respond",
    "Step",
    "TakeReply",
]


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
        request_deadline: Seconds a request may take to arrive whole once it has begun
            (its REST headers arrived, its gRPC call opened), however it trickles; over it,
            the request is refused and its connection (REST) or call (gRPC) closed. None
            (default): the heartbeat timeout (at least 5 s) plus the request's size
            bound (its declared length on REST, else the bound of the call) divided by
            ``min_throughput``.
        min_throughput: Bytes per second a request must average for the default
            ``request_deadline`` (default 256 KiB/s).
        max_connections: REST connections open at once (None: half the process's file
            descriptor limit, at least 64). At the limit, a new connection makes the
            server close the one that has waited longest without sending a whole request
            (it is refused only when every connection is being served).
        max_connections_per_peer: REST connections open at once from one IP address
            (None: a quarter of ``max_connections``, at least 16); more are closed as
            they arrive.
        max_grpc_connections: gRPC connections open at once (None: the descriptor limit
            less REST's ``max_connections`` and a reserve of an eighth, at least 64, for
            the server's own files; at least 64). gRPC closes more as they arrive; from
            7/8 of it the server closes connections that carry no call, down to 3/4,
            from the addresses holding the most connections first.
        max_grpc_unused_per_peer: gRPC connections from one IP address that have not
            made a call yet (None: a quarter of ``max_grpc_connections``, at least 16).
            The server closes more, the longest-known first, once they have been
            connected for 2 s without a call. Connections that made a call do not
            count: a node makes its first call as soon as it is connected, so any number
            of nodes may share an address (a host, a NAT, 127.0.0.1); only clients that
            hold connections without using them are cut.
        max_unverified_bytes: Bytes of requests being received or served at once, on
            every listener together, before they are answered (signature, decoding): REST
            counts a body's bytes as they arrive, gRPC a call's method size bound until its
            message is in (gRPC shows no byte before), then each its own size. A request
            that would go over is refused, 503 / UNAVAILABLE (the node retries), before
            its body is read (None: ``max_message_length`` + 64 MiB).
        max_reply_size: Largest framed reply whose size the server cannot derive from the
            instruction sent (a GetParametersIns, an empty model; None: half the machine's
            memory). A reply to an instruction carrying a model may be at most 8 times
            that model plus ``max_message_length``.
        create_node_rate: Registrations per second one IP address may make when nodes
            are not authenticated (token bucket, burst ``create_node_burst``); over it,
            CreateNode is refused with UNAVAILABLE / HTTP 429. None: no limit.
        create_node_burst: Registrations one IP address may make at once.
        create_node_global_rate: Registrations per second from everyone together (burst
            ``10 x`` the rate); None: no limit.
    """

    heartbeat_interval: float = 15.0
    heartbeat_timeout: float | None = None
    poll_timeout: float = 10.0
    connection_idle_limit: float | None = None
    request_deadline: float | None = None
    min_throughput: float = 256 * 1024
    max_connections: int | None = None
    max_connections_per_peer: int | None = None
    max_grpc_connections: int | None = None
    max_grpc_unused_per_peer: int | None = None
    max_unverified_bytes: int | None = None
    max_reply_size: int | None = None
    create_node_rate: float | None = 20.0
    create_node_burst: int = 200
    create_node_global_rate: float | None = 200.0

    def __post_init__(self) -> None:
        for name in ("connection_idle_limit", "request_deadline", "min_throughput"):
            limit = getattr(self, name)
            if limit is not None and not (math.isfinite(limit) and limit > 0):
                raise ValueError(
                    f"{name}: expected a positive number of seconds, received {limit!r}"
                    if name != "min_throughput"
                    else f"{name}: expected a positive number of bytes/s, received {limit!r}"
                )
        for name in (
            "max_connections",
            "max_connections_per_peer",
            "max_grpc_connections",
            "max_grpc_unused_per_peer",
            "max_unverified_bytes",
            "max_reply_size",
            "create_node_rate",
            "create_node_global_rate",
        ):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a positive number or None, received {value!r}")
        if self.create_node_burst < 1:
            raise ValueError(
                f"create_node_burst: expected at least 1, received {self.create_node_burst!r}"
            )

    def deadline_for(self, size: int) -> float:
        """Seconds a request of at most ``size`` bytes may take to arrive (see
        ``request_deadline``)."""
        if self.request_deadline is not None:
            return self.request_deadline
        return max(self.silence_limit, 5.0) + size / self.min_throughput

    def rest_connection_limits(self, descriptors: int) -> tuple[int, int]:
        """REST connections open at once, in all and per IP address, for a process that
        may open ``descriptors`` files (see ``max_connections``)."""
        total = self.max_connections or max(64, descriptors // 2)
        return total, self.max_connections_per_peer or max(16, total // 4)

    def grpc_connection_limits(self, descriptors: int, *, rest: bool) -> tuple[int, int]:
        """gRPC connections open at once, and connections that have not made a call yet
        per IP address, for a process that may open ``descriptors`` files and serves
        REST or not (see ``max_grpc_connections``, ``max_grpc_unused_per_peer``)."""
        if self.max_grpc_connections is not None:
            cap = self.max_grpc_connections
        else:
            reserve = max(64, descriptors // 8)
            rest_share = self.rest_connection_limits(descriptors)[0] if rest else 0
            cap = max(64, descriptors - reserve - rest_share)
        return cap, self.max_grpc_unused_per_peer or max(16, cap // 4)

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

    @property
    def liveness_period(self) -> float:
        """How often the shell should look for silent nodes."""
        return max(0.01, min(self.heartbeat_interval, self.silence_limit) / 2)


class Reader(Protocol):
    """Puts one link's incoming frames back together (``stamen.wire.FrameReader``)."""

    @property
    def in_progress(self) -> bool:
        """True while a framed message is incomplete."""
        ...

    @property
    def received(self) -> int:
        """Bytes received of the message being put together."""
        ...

    def reset(self) -> None:
        """Drop a partial message."""
        ...

    def bound(
        self,
        max_total: int | None,
        min_frame: int = 0,
        allocate: Callable[[int], Any] | None = None,
    ) -> None:
        """Bound the next message's announced size and its frames' size; ``allocate``
        gives the buffer it is written into (None: the reader's own)."""
        ...

    def feed(self, data: bytes | memoryview) -> bytes | memoryview | None:
        """Take one received message; the whole message once complete, else None."""
        ...


class Framing(Protocol):
    """How messages are cut into frames: the wire's business, injected here."""

    def reader(self) -> Reader:
        """A fresh reader for one node's replies."""
        ...

    def is_frame(self, data: bytes | memoryview) -> bool:
        """Whether ``data`` is one frame of a larger message."""
        ...

    def frame_size(self, max_message_length: int) -> int:
        """Data bytes per frame on a link bounded by ``max_message_length``."""
        ...

    def offset(self, data: bytes | memoryview) -> int | None:
        """Where in its message the frame ``data`` starts; None if ``data`` is not a
        well-formed frame."""
        ...


@dataclass(eq=False)
class NodeRecord:
    """The protocol state of one connected node."""

    cid: str
    node_id: int
    transport: str
    peer: str
    mailbox: Mailbox
    reader: Reader
    frame_size: int
    max_message_length: int
    pull_based: bool = False
    frames: bool = False
    key: str | None = None
    last_seen: float = 0.0
    polls: int = 0
    """Long-polls held open now (a node with one is alive: it is waiting for work)."""
    reading_task: int = 0
    """The task whose reply :attr:`reader` is putting together."""
    slot: Admission | None = None
    """The receive slot the node holds for the large reply it is sending (None: none)."""
    silence_limit: float | None = None
    """This node's own heartbeat timeout (a Flower node's, from its ping interval);
    None: the fleet's :attr:`FleetTiming.silence_limit`."""
    flower: bool = False
    """A node of Flower 1.12's Fleet API (``protocol.flower_server``): whole messages,
    no frames, its tasks named by Flower task ids."""
    flower_tasks: dict[int, str] = field(default_factory=dict)
    """Flower's task id of each of this node's tasks delivered as a TaskIns."""


# --- Steps: what a Fleet request asks of the shell --------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a Fleet request: the transport, the peer's address and the fingerprint
    of the key that signed it (None: nodes are not authenticated)."""

    transport: str
    peer: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Respond:
    """Send ``response`` (None: the empty response)."""

    response: CreateNodeResponse | PullResponse | None = None


@dataclass(frozen=True, slots=True)
class AwaitTask:
    """Long-poll: wait up to ``timeout`` seconds for the node's next task, tell
    :meth:`FleetState.poll_ended`, and answer :meth:`FleetState.pull_response`."""

    node: NodeRecord
    timeout: float


@dataclass(frozen=True, slots=True)
class TakeReply:
    """A pushed message of the reply to ``task_id``: put it through
    :meth:`FleetState.reception`, then answer with the empty response."""

    node: NodeRecord
    task_id: int
    data: bytes | memoryview


Step = Respond | AwaitTask | TakeReply


FRAMES_AHEAD = 4
"""Frames ahead of the reader that a pushed frame may be and still wait for the earlier
ones (:meth:`FleetState.ahead_of_turn`): a node has two in flight, and one sent again
after a failure may come later still; a frame further ahead is a gap at once."""


class Reception(Enum):
    """What to do with one received message of a reply (see :meth:`FleetState.reception`)."""

    IGNORE = "a frame of a task that ended: drop it"
    LATE = "a whole reply to a task that ended: decode it (to check it), then discard it"
    NEEDS_SLOT = "the first frame of a large reply: take a receive slot, then feed it"
    FEED = "feed it to the node's reader"


def _random_node_id() -> int:
    return secrets.randbits(63) or 1


def _random_cid() -> str:
    return uuid.uuid4().hex


class FleetEvents(Protocol):
    """What the shell is told when nodes come and go (it attaches its IO handles)."""

    def joined(self, node: NodeRecord) -> None:
        """``node`` was registered."""
        ...

    def left(self, node: NodeRecord, error: BaseException | None) -> None:
        """``node`` was removed (its tasks already ended with ``error``)."""
        ...


class _NoEvents:
    def joined(self, node: NodeRecord) -> None:
        pass

    def left(self, node: NodeRecord, error: BaseException | None) -> None:
        pass


class FleetState:
    """Every connected node and the Fleet protocol's transitions (see the module docstring).

    Args:
        clock: Where time comes from (liveness, ``last_seen``).
        framing: How messages are cut into frames.
        max_message_length: The server's bound of one message, both ways.
        timing: Heartbeat and long-poll timing of pull-based nodes.
        new_node_id: Ids for pull-based nodes (random 63-bit by default).
        new_cid: Ids for stream nodes (random hex by default).
        events: Told of every node that joins or leaves.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        framing: Framing,
        max_message_length: int,
        timing: FleetTiming | None = None,
        new_node_id: Callable[[], int] = _random_node_id,
        new_cid: Callable[[], str] = _random_cid,
        events: FleetEvents | None = None,
    ) -> None:
        self.events: FleetEvents = events if events is not None else _NoEvents()
        self.clock = clock
        self.framing = framing
        self.max_message_length = max_message_length
        self.timing = timing or FleetTiming()
        self._new_node_id = new_node_id
        self._new_cid = new_cid
        self._nodes: dict[str, NodeRecord] = {}
        self.closing = False

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[NodeRecord]:
        return iter(list(self._nodes.values()))

    def get(self, cid: str) -> NodeRecord | None:
        """The node ``cid``, if connected."""
        return self._nodes.get(cid)

    # --- the registry ------------------------------------------------------------------

    def open(
        self,
        transport: str,
        peer: str,
        *,
        pull_based: bool = False,
        frames: bool = False,
        max_message_length: int = 0,
        key: str | None = None,
        flower: bool = False,
    ) -> NodeRecord:
        """Register a new node.

        ``frames``: the node takes messages in frames (every Stamen node; Stamen's
        pull-based nodes always do). ``max_message_length``: the node's own bound (0:
        unknown), which frames respect. ``flower``: a pull-based node of Flower's Fleet
        API, which takes whole messages only.
        """
        frames = (frames or pull_based) and not flower
        limit = self.max_message_length
        if max_message_length > 0:
            limit = min(limit, max_message_length)
        if pull_based:
            node_id = self._new_node_id()
            while str(node_id) in self._nodes:
                node_id = self._new_node_id()
            cid = str(node_id)
        else:
            node_id, cid = -1, self._new_cid()
        node = NodeRecord(
            cid=cid,
            node_id=node_id,
            transport=transport,
            peer=peer,
            mailbox=Mailbox(cid),
            reader=self.framing.reader(),
            frame_size=self.framing.frame_size(limit),
            max_message_length=limit,
            pull_based=pull_based,
            frames=frames,
            key=key,
            last_seen=self.clock.monotonic(),
            flower=flower,
        )
        self._nodes[cid] = node
        self.events.joined(node)
        return node

    def close(self, node: NodeRecord, error: BaseException | None = None) -> bool:
        """Remove the node and end its tasks with ``error``; False if it was gone already."""
        if self._nodes.pop(node.cid, None) is None:
            return False
        node.mailbox.close(error)
        self.events.left(node, error)
        return True

    def close_all(self, reason: str) -> None:
        """Close every node and refuse new requests (server shutdown)."""
        self.closing = True
        for node in list(self._nodes.values()):
            self.close(node, ConnectionLost(f"node {node.cid}: {reason}"))

    def silent(self) -> list[NodeRecord]:
        """Pull-based nodes that neither poll nor spoke for longer than their heartbeat
        timeout (:meth:`silence_limit_of`; the shell closes them)."""
        now = self.clock.monotonic()
        return [
            node
            for node in self._nodes.values()
            if node.pull_based
            and node.polls == 0
            and now - node.last_seen > self.silence_limit_of(node)
        ]

    def silence_limit_of(self, node: NodeRecord) -> float:
        """Seconds ``node`` may be silent: its own limit, else the fleet's."""
        if node.silence_limit is not None:
            return node.silence_limit
        return self.timing.silence_limit

    # --- Fleet requests (grpc-rere, rest) ----------------------------------------------

    def request(self, verb: str, request: object, caller: Caller) -> Step:
        """Serve one decoded Fleet request of the call named ``verb`` (a
        ``stamen.wire.Verb`` name) from ``caller``.

        Raises:
            FleetError: the request is refused; the shell maps its kind to a status.
        """
        if self.closing:
            raise FleetError(ErrorKind.UNAVAILABLE, "server is shutting down")
        transition = TRANSITIONS.get(verb)
        if transition is None:
            raise FleetError(ErrorKind.INVALID_ARGUMENT, f"unknown Fleet verb {verb!r}")
        return transition(self, request, caller)

    def _check_version(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise FleetError(
                ErrorKind.VERSION_MISMATCH,
                f"Fleet protocol version: expected {PROTOCOL_VERSION}, received {version} "
                "(upgrade the node or the server so both speak the same version)",
            )

    def lookup(self, node_id: int, version: int, key: str | None) -> NodeRecord:
        """The registered pull-based node ``node_id`` of ``key``, seen now.

        Raises:
            FleetError: wrong protocol version, unknown node, or another key's node.
        """
        self._check_version(version)
        node = self._nodes.get(str(node_id))
        if node is None or not node.pull_based or node.flower:  # Flower's: its own calls
            raise FleetError(ErrorKind.UNKNOWN_NODE, f"node {node_id} is not registered")
        if node.key != key:
            raise FleetError(ErrorKind.UNAUTHENTICATED, f"node {node_id} belongs to another key")
        node.last_seen = self.clock.monotonic()
        return node

    def _create_node(self, request: object, caller: Caller) -> Step:
        create = _expect(CreateNodeRequest, request)
        self._check_version(create.protocol_version)
        node = self.open(
            caller.transport,
            caller.peer,
            pull_based=True,
            max_message_length=create.max_message_length,
            key=caller.key,
        )
        timing = self.timing
        return Respond(
            CreateNodeResponse(
                node.node_id,
                timing.heartbeat_interval,
                timing.poll_timeout,
                self.max_message_length,
            )
        )

    def _pull(self, request: object, caller: Caller) -> Step:
        pull = _expect(PullRequest, request)
        node = self.lookup(pull.node_id, pull.protocol_version, caller.key)
        if pull.task_id:
            task = node.mailbox.in_flight(pull.task_id)
            if task is not None and 0 < pull.offset < len(task.payload):
                frame = task.payload.frame_payload(pull.offset, node.frame_size)
                if pull.offset + node.frame_size >= len(task.payload):
                    task.delivered()  # its last frame
                return Respond(PullResponse(task.task_id, frame))
        node.polls += 1
        return AwaitTask(node, self.timing.poll_timeout)

    def poll_ended(self, node: NodeRecord) -> None:
        """A long-poll of ``node`` ended (with a task, a timeout or an error)."""
        node.polls -= 1
        node.last_seen = self.clock.monotonic()

    def pull_response(self, node: NodeRecord, task: Task | None) -> PullResponse:
        """The response to a long-poll that ended with ``task`` (None: none came in
        time): the whole instruction, or its first frame."""
        if task is None:
            return PullResponse(0, b"")
        payload = task.payload
        if len(payload) <= node.frame_size:
            task.delivered()
            return PullResponse(task.task_id, payload.tobytes())
        return PullResponse(task.task_id, payload.frame_payload(0, node.frame_size))

    def _push(self, request: object, caller: Caller) -> Step:
        push = _expect(PushRequest, request)
        node = self.lookup(push.node_id, push.protocol_version, caller.key)
        return TakeReply(node, push.task_id, push.client_message)

    def _heartbeat(self, request: object, caller: Caller) -> Step:
        beat = _expect(SimpleRequest, request)
        self.lookup(beat.node_id, beat.protocol_version, caller.key)
        return Respond()

    def _delete_node(self, request: object, caller: Caller) -> Step:
        gone = _expect(SimpleRequest, request)
        self._check_version(gone.protocol_version)
        node = self._nodes.get(str(gone.node_id))
        if node is not None and node.pull_based and not node.flower and node.key == caller.key:
            self.close(node, ConnectionLost(f"node {gone.node_id} left"))
        return Respond()

    # --- replies (every transport) -----------------------------------------------------

    def reception(self, node: NodeRecord, task_id: int, data: bytes | memoryview) -> Reception:
        """Decide what to do with one received message of the reply to ``task_id``.

        A frame for a task that already ended (sent again after a lost response) is
        ignored; a new task's first message drops what the reader held of another's.
        """
        if node.reading_task != task_id:
            node.reader.reset()
            node.reading_task = task_id
        task = node.mailbox.in_flight(task_id)
        if not node.reader.in_progress:
            framed = self.framing.is_frame(data)
            if task is None:
                return Reception.IGNORE if framed else Reception.LATE
            if framed and node.slot is None:
                return Reception.NEEDS_SLOT
        return Reception.FEED

    def ahead_of_turn(self, node: NodeRecord, task_id: int, data: bytes | memoryview) -> bool:
        """Whether the pushed message ``data`` is a frame of the reply to ``task_id`` that
        came before an earlier frame of it, at most :data:`FRAMES_AHEAD` frames ahead: a
        node pushes a large reply's frames a few at a time
        (``stamen.transport.fleet.PUSHES_IN_FLIGHT``), and concurrent requests may
        overtake each other. Such a frame waits for the earlier ones (:meth:`reception`
        would take it for a gap); one further ahead is no such overtaking, and is not
        kept waiting."""
        offset = self.framing.offset(data)
        if not offset or node.mailbox.in_flight(task_id) is None:
            return False  # a whole reply, a first frame, a malformed one, or an ended task
        received = node.reader.received if node.reading_task == task_id else 0
        return received < offset <= received + FRAMES_AHEAD * node.frame_size

    def stream_reception(self, node: NodeRecord, data: bytes | memoryview) -> Reception:
        """:meth:`reception` on a stream (grpc-bidi), where every message belongs to the
        instruction just sent: a reply to a task that ended meanwhile is still read to
        its end (then discarded as late), or the stream would lose its place."""
        if not node.reader.in_progress and self.framing.is_frame(data) and node.slot is None:
            return Reception.NEEDS_SLOT
        return Reception.FEED

    def deliver(self, node: NodeRecord, task_id: int, reply: Reply) -> bool:
        """End task ``task_id`` with its decoded reply; False for a late reply."""
        return node.mailbox.deliver(task_id, reply)

    def fail(self, node: NodeRecord, task_id: int, error: BaseException) -> None:
        """End task ``task_id`` with ``error`` (its reply was malformed); the partial
        reply is dropped."""
        node.reader.reset()
        node.mailbox.fail(task_id, error)


_T = TypeVar("_T")


def _expect(kind: type[_T], request: object) -> _T:
    if not isinstance(request, kind):
        raise FleetError(
            ErrorKind.INVALID_ARGUMENT,
            f"expected a {kind.__name__}, received {type(request).__name__}",
        )
    return request


TRANSITIONS: dict[str, Callable[[FleetState, object, Caller], Step]] = {
    "CREATE_NODE": FleetState._create_node,
    "PULL": FleetState._pull,
    "PUSH": FleetState._push,
    "HEARTBEAT": FleetState._heartbeat,
    "DELETE_NODE": FleetState._delete_node,
}
"""The Fleet protocol: each call's name and the transition that serves it."""
