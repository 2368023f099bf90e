"""A node's session with a Flower 1.12 SuperLink over Flower's Fleet API, sans-IO.

:class:`FlowerClientState` is what a Stamen node knows of its session with a Flower
SuperLink (grpc-rere or rest): its node id, the run it serves, the task being answered,
when to ping and when to poll again. It builds each request of
:mod:`stamen.protocol.flower_fleet` and takes each response; the transport
(``stamen.transport.flower_fleet``) only sends them and waits.

Flower 1.12's cadence, mirrored here:

* CreateNode announces a ping interval of 30 s; the node then pings every
  ``(30 - 5) * (0.8 ± 0.1)`` s (25 s minus a random margin, the 5 s being the ping's own
  call timeout), idle or busy: a SuperLink counts a node as online only until its last
  ping (or CreateNode) plus the announced interval, and PullTaskIns does not count.
* The SuperLink answers PullTaskIns at once, with zero or one task. A Flower node waits
  3 s after an empty pull; a Stamen node waits 0.05 s, doubling after each empty pull up
  to those 3 s, and starts again from 0.05 s once a task arrived (so a node of a running
  federation picks the next round's task up within milliseconds, and an idle one costs the
  SuperLink what a Flower node does).
* A task of a run the node has not seen makes it ask GetRun first.
* The reply to TaskIns ``t`` is a TaskRes with an empty task id (the SuperLink assigns
  it), ``t``'s group and run, producer = this node, consumer = the anonymous SuperLink,
  ``created_at`` = now, ``ttl`` = what is left of ``t``'s (``t.ttl - (now -
  t.created_at)``), ancestry ``[t.task_id]`` and ``t``'s message type.
* A client that raised (Stamen's ``CLIENT_ERROR`` status) answers, as a Flower node
  whose ClientApp raised, with a TaskRes carrying Flower's error
  ``CLIENT_APP_RAISED_EXCEPTION`` and the reason: the ServerApp's legacy workflow counts
  it as one failure of the round. A task Stamen cannot read (a ``query``, or a RecordSet
  without the legacy records) is answered the same way, so the ServerApp is not left
  waiting for its round timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError, ConnectionLost, NodeUnknown, ProtocolError
from ..messages import (
    Code,
    EvaluateRes,
    FitRes,
    GetParametersRes,
    GetPropertiesRes,
    Instruction,
    Reply,
)
from .flower_fleet import (
    ANONYMOUS,
    CreateNodeRequest,
    CreateNodeResponse,
    DeleteNodeRequest,
    ErrorCode,
    FlowerError,
    GetRunRequest,
    GetRunResponse,
    LegacyReply,
    Node,
    PingRequest,
    PingResponse,
    PullTaskInsRequest,
    PullTaskInsResponse,
    PushTaskResRequest,
    TaskIns,
    TaskMeta,
    TaskRes,
    UnreadableTask,
    message_type_of,
)

__all__ = [
    "PING_CALL_TIMEOUT",
    "PING_INTERVAL",
    "POLL_FIRST_DELAY",
    "POLL_MAX_DELAY",
    "Answer",
    "FlowerClientState",
    "Idle",
    "Serve",
]

PING_INTERVAL = 30.0
"""Seconds a node announces it will ping within (Flower 1.12's default)."""

PING_CALL_TIMEOUT = 5.0
"""Seconds one ping may take (Flower 1.12's)."""

_PING_MULTIPLIER = 0.8
_PING_JITTER = 0.1

POLL_FIRST_DELAY = 0.05
"""Seconds before the next pull after a first empty one."""

POLL_MAX_DELAY = 3.0
"""The longest wait between two pulls: a Flower 1.12 node's fixed wait."""


@dataclass(frozen=True, slots=True)
class Idle:
    """No task yet: pull again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Serve:
    """A task to run: ``instruction`` goes to the client; ``get_run`` (if not None) is to
    be sent first, this being the first task of a run the node has not seen."""

    instruction: Instruction
    get_run: GetRunRequest | None


@dataclass(frozen=True, slots=True)
class Answer:
    """A task the node answers at once (it cannot run it): push ``push``, ``reason`` says
    why (for the log)."""

    push: PushTaskResRequest
    reason: str


class FlowerClientState:
    """One node's session with a Flower SuperLink (see the module docstring).

    Args:
        now: Unix time in seconds (``created_at`` and ``ttl`` of replies).
        rng: Uniform floats in [0, 1) (the ping's jitter).
    """

    def __init__(self, now: Callable[[], float], rng: Callable[[], float]) -> None:
        self._now = now
        self._rng = rng
        self.node_id = 0
        self._task: TaskMeta | None = None
        """The TaskIns being answered (None: none)."""
        self._runs: dict[int, GetRunResponse | None] = {}
        """Runs seen: their GetRun answer once received."""
        self._poll_delay = POLL_FIRST_DELAY

    # --- registration and liveness -------------------------------------------------------

    def create_request(self) -> CreateNodeRequest:
        """The registration request."""
        return CreateNodeRequest(ping_interval=PING_INTERVAL)

    def registered(self, response: CreateNodeResponse) -> None:
        """Take the SuperLink's answer to CreateNode.

        Raises:
            ProtocolError: no node id (a Flower SuperLink answers 0 when it could not
                register the node, e.g. a public key already bound to another node).
        """
        if response.node.node_id == 0:
            raise ProtocolError("Flower CreateNode: expected a node id, received 0")
        self.node_id = response.node.node_id
        self._poll_delay = POLL_FIRST_DELAY

    @property
    def node(self) -> Node:
        """This node, as Flower's requests name it."""
        return Node(node_id=self.node_id, anonymous=False)

    def ping_request(self) -> PingRequest | None:
        """A ping (None: not registered)."""
        return PingRequest(self.node, PING_INTERVAL) if self.node_id else None

    def pinged(self, response: PingResponse) -> None:
        """Take a ping's answer.

        Raises:
            NodeUnknown: the SuperLink no longer knows this node (register again).
        """
        if not response.success:
            raise NodeUnknown(f"Flower SuperLink does not know node {self.node_id} any more")

    def ping_delay(self) -> float:
        """Seconds until the next ping: ``(30 - 5) * (0.8 ± 0.1)``."""
        jitter = (2.0 * self._rng() - 1.0) * _PING_JITTER
        return (PING_INTERVAL - PING_CALL_TIMEOUT) * (_PING_MULTIPLIER + jitter)

    # --- tasks -----------------------------------------------------------------------------

    def pull_request(self) -> PullTaskInsRequest:
        """The next pull."""
        return PullTaskInsRequest(self.node)

    def pulled(self, response: PullTaskInsResponse) -> Idle | Serve | Answer:
        """Take a pull's answer: wait and pull again, serve a task, or answer one at once.

        A task addressed to another node is ignored, as a Flower node ignores it.
        """
        tasks = [
            t
            for t in response.task_ins_list
            if t.meta.consumer.node_id == self.node_id and not t.meta.consumer.anonymous
        ]
        if not tasks:
            delay = self._poll_delay
            self._poll_delay = min(POLL_MAX_DELAY, delay * 2)
            return Idle(delay)
        self._poll_delay = POLL_FIRST_DELAY
        task = tasks[0]  # a Flower SuperLink sends at most one
        self._task = task.meta
        if isinstance(task, UnreadableTask):
            error = FlowerError(
                int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION),
                f"Stamen node cannot run this task: {task.reason}",
            )
            return Answer(self._push(error=error), task.reason)
        assert isinstance(task, TaskIns)
        get_run = None
        if task.meta.run_id not in self._runs:
            self._runs[task.meta.run_id] = None
            get_run = GetRunRequest(self.node, task.meta.run_id)
        return Serve(task.instruction, get_run)

    def got_run(self, response: GetRunResponse) -> None:
        """Take GetRun's answer (kept for the run's later tasks)."""
        self._runs[response.run.run_id] = response

    def reply_request(self, reply: Reply) -> PushTaskResRequest:
        """The push that carries ``reply`` to the task being answered.

        A ``CLIENT_ERROR`` reply becomes Flower's ``CLIENT_APP_RAISED_EXCEPTION`` error with
        the status message as its reason.

        Raises:
            ConnectionLost: there is no task to answer (its session was lost).
            ConfigError: ``reply`` has no form in Flower's Fleet API.
        """
        if not isinstance(reply, FitRes | EvaluateRes | GetParametersRes | GetPropertiesRes):
            message_type_of(reply)  # raises ConfigError: no Flower form
            raise ConfigError(f"reply: {type(reply).__name__} has no Flower form")
        if reply.status.code is Code.CLIENT_ERROR:
            error = FlowerError(int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION), reply.status.message)
            return self._push(error=error)
        return self._push(reply=reply)

    def _push(
        self, *, reply: LegacyReply | None = None, error: FlowerError | None = None
    ) -> PushTaskResRequest:
        task = self._task
        if task is None:
            raise ConnectionLost("send() without a task to answer")
        now = self._now()
        meta = TaskMeta(
            task_id="",
            run_id=task.run_id,
            message_type=task.message_type,
            group_id=task.group_id,
            producer=self.node,
            consumer=ANONYMOUS,
            created_at=now,
            ttl=task.ttl - (now - task.created_at),
            ancestry=(task.task_id,),
        )
        return PushTaskResRequest(self.node, (TaskRes(meta, reply=reply, error=error),))

    def replied(self) -> None:
        """The reply went through: no task is being answered."""
        self._task = None

    # --- leaving ---------------------------------------------------------------------------

    def delete_request(self) -> DeleteNodeRequest | None:
        """The unregistration (None: not registered)."""
        return DeleteNodeRequest(self.node) if self.node_id else None

    def unregistered(self) -> None:
        """The node is no longer registered."""
        self.node_id = 0
        self._task = None
