"""Flower 1.12's Fleet API as a second set of transitions of the fleet state, sans-IO.

A Flower 1.12 node (``start_client(transport="grpc-rere" | "rest")``, ``flower-supernode``)
is a pull-based node of the same :class:`~stamen.protocol.fleet_server.FleetState` as
Stamen's own nodes: it registers (CreateNode), is offered to the strategy like any node,
pulls each instruction as a TaskIns, pushes its TaskRes and pings while busy. What differs
is the messages (:mod:`stamen.protocol.flower_fleet`, decoded and encoded by the shell
with ``wire.flower_codec``) and that a Flower node takes whole messages only: no frames.

:class:`FlowerLink` serves one decoded request of a call (:data:`FLOWER_TRANSITIONS`) and
answers with a step: :class:`FlowerRespond`, or
:class:`~stamen.protocol.fleet_server.AwaitTask` (a long-poll: Flower's node has no deadline
on PullTaskIns, and an empty answer makes it sleep 3 s before pulling again), after which
the shell asks :meth:`FlowerLink.outgoing` what to send.

* **Liveness.** A node is silent after 1.5 times the ping interval it announced (with
  CreateNode and each Ping), clamped to [1 s, 1 day]; a node long-polling is alive.
* **End of run.** ``ReconnectIns`` travels as a TaskIns of type ``reconnect`` (configs
  record ``config`` = ``{"seconds": n}``), which Flower 1.12's node answers with a TaskRes
  of that type, then unregisters; with ``seconds == 0`` its ``start_client`` returns
  (exit 0). The answer is delivered as ``DisconnectRes(RECONNECT)`` and the node closed.
* **Task ids.** Each task delivered gets a random Flower task id (a UUID), kept while the
  task is in flight: a node's TaskRes names it in its ``ancestry``.
* **Runs.** Every task carries the fleet's run id; GetRun answers it as a legacy run (no
  app bundle, no config overrides); GetFab has nothing to give (NOT_FOUND).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

from ..errors import ClientAppError, ConnectionLost, DecodeError
from ..messages import DisconnectRes, Reason, ReconnectIns
from .fleet import ErrorKind, FleetError
from .fleet_server import AwaitTask, Caller, FleetState, NodeRecord
from .flower_fleet import (
    ANONYMOUS,
    RECONNECT,
    CreateNodeRequest,
    CreateNodeResponse,
    DeleteNodeRequest,
    DeleteNodeResponse,
    GetFabRequest,
    GetRunRequest,
    GetRunResponse,
    Node,
    PingRequest,
    PingResponse,
    PullTaskInsRequest,
    PushTaskResRequest,
    PushTaskResResponse,
    ReconnectTask,
    Run,
    TaskIns,
    TaskMeta,
    TaskRes,
    UnreadableTask,
    message_type_of,
)
from .mailbox import Task

__all__ = [
    "CLOCK_SKEW_MARGIN",
    "FLOWER_TRANSITIONS",
    "FLOWER_TTL",
    "FlowerLink",
    "FlowerRespond",
    "FlowerResponse",
    "FlowerStep",
    "silence_limit_for",
]

FLOWER_TTL = 3600.0
"""Seconds a TaskIns lives (Flower 1.12's default message TTL)."""

CLOCK_SKEW_MARGIN = 60.0
"""Seconds a TaskIns's ``created_at`` is set before the server's wall clock. Flower 1.12's
node refuses to send a reply not created after the instruction it answers (by its own
clock), so a node whose clock is behind the server's would never answer; this margin
tolerates that much skew."""

_MIN_SILENCE = 1.0
_MAX_SILENCE = 86400.0

FlowerResponse: TypeAlias = (
    CreateNodeResponse | DeleteNodeResponse | PingResponse | PushTaskResResponse | GetRunResponse
)


@dataclass(frozen=True, slots=True)
class FlowerRespond:
    """Send ``response``."""

    response: FlowerResponse


FlowerStep: TypeAlias = FlowerRespond | AwaitTask


def silence_limit_for(ping_interval: float) -> float:
    """Seconds a node that pings every ``ping_interval`` seconds may be silent.

    Flower 1.12's node announces 30 s and pings every 17.5-22.5 s (each ping may take 5 s
    more); 1.5 intervals leave room for one slow ping.
    """
    return min(max(1.5 * ping_interval, _MIN_SILENCE), _MAX_SILENCE)


def _random_run_id() -> int:
    return secrets.randbits(63) or 1


def _random_task_id() -> str:
    return str(uuid.uuid4())


_T = TypeVar("_T")


def _expect(kind: type[_T], request: object) -> _T:
    if not isinstance(request, kind):
        raise FleetError(
            ErrorKind.INVALID_ARGUMENT,
            f"expected a {kind.__name__}, received {type(request).__name__}",
        )
    return request


class FlowerLink:
    """Flower 1.12's Fleet API over one :class:`FleetState` (see the module docstring).

    Args:
        state: The fleet state Flower nodes join, beside every other node.
        run_id: The run id every task carries (random by default).
        new_task_id: Flower task ids (random UUIDs by default).
    """

    def __init__(
        self,
        state: FleetState,
        *,
        run_id: int | None = None,
        new_task_id: Callable[[], str] = _random_task_id,
    ) -> None:
        self.state = state
        self.run_id = _random_run_id() if run_id is None else run_id
        self._new_task_id = new_task_id

    def request(self, call: str, request: object, caller: Caller) -> FlowerStep:
        """Serve one decoded request of the Flower call named ``call`` (a
        ``stamen.wire.flower_routes.FlowerCall`` name).

        Raises:
            FleetError: the request is refused; the shell maps its kind to a status.
        """
        if self.state.closing:
            raise FleetError(ErrorKind.UNAVAILABLE, "server is shutting down")
        transition = FLOWER_TRANSITIONS.get(call)
        if transition is None:
            raise FleetError(ErrorKind.INVALID_ARGUMENT, f"unknown Flower Fleet call {call!r}")
        return transition(self, request, caller)

    # --- nodes -------------------------------------------------------------------------

    def _find(self, node: Node) -> NodeRecord | None:
        record = self.state.get(str(node.node_id))
        if record is None or not record.flower:
            return None
        return record

    def lookup(self, node: Node, caller: Caller) -> NodeRecord:
        """The registered Flower node ``node`` of the caller's key, seen now.

        Raises:
            FleetError: unknown node (NOT_FOUND), or another key's node (UNAUTHENTICATED).
        """
        record = self._find(node)
        if record is None:
            raise FleetError(ErrorKind.UNKNOWN_NODE, f"node {node.node_id} is not registered")
        if record.key != caller.key:
            raise FleetError(
                ErrorKind.UNAUTHENTICATED, f"node {node.node_id} belongs to another key"
            )
        record.last_seen = self.state.clock.monotonic()
        return record

    def _create_node(self, request: object, caller: Caller) -> FlowerStep:
        create = _expect(CreateNodeRequest, request)
        node = self.state.open(
            caller.transport, caller.peer, pull_based=True, flower=True, key=caller.key
        )
        node.silence_limit = silence_limit_for(create.ping_interval)
        return FlowerRespond(CreateNodeResponse(Node(node.node_id)))

    def _delete_node(self, request: object, caller: Caller) -> FlowerStep:
        gone = _expect(DeleteNodeRequest, request)
        record = self._find(gone.node)
        if record is not None and record.key == caller.key:
            self.state.close(record, ConnectionLost(f"node {record.node_id} left"))
        return FlowerRespond(DeleteNodeResponse())

    def _ping(self, request: object, caller: Caller) -> FlowerStep:
        ping = _expect(PingRequest, request)
        record = self._find(ping.node)
        if record is None:
            return FlowerRespond(PingResponse(success=False))  # as Flower's SuperLink
        record = self.lookup(ping.node, caller)
        record.silence_limit = silence_limit_for(ping.ping_interval)
        return FlowerRespond(PingResponse(success=True))

    # --- tasks -------------------------------------------------------------------------

    def _pull(self, request: object, caller: Caller) -> FlowerStep:
        pull = _expect(PullTaskInsRequest, request)
        record = self.lookup(pull.node, caller)
        record.polls += 1
        return AwaitTask(record, self.state.timing.poll_timeout)

    def outgoing(self, node: NodeRecord, task: Task, now: float) -> TaskIns | ReconnectTask:
        """What to send for ``task`` (taken for ``node``): its TaskIns, or the reconnect
        TaskIns of a ``ReconnectIns``. ``now`` is the wall clock (seconds since the epoch).

        Raises:
            ConfigError: the instruction has no form in Flower's Fleet API.
        """
        flower_id = node.flower_tasks.get(task.task_id)
        if flower_id is None:
            flower_id = node.flower_tasks[task.task_id] = self._new_task_id()
        instruction = task.instruction
        kind = RECONNECT if isinstance(instruction, ReconnectIns) else message_type_of(instruction)
        meta = TaskMeta(
            task_id=flower_id,
            run_id=self.run_id,
            message_type=kind,
            producer=ANONYMOUS,
            consumer=Node(node.node_id),
            created_at=now - CLOCK_SKEW_MARGIN,
            ttl=FLOWER_TTL + CLOCK_SKEW_MARGIN,
        )
        if isinstance(instruction, ReconnectIns):
            return ReconnectTask(meta, instruction.seconds or 0)
        return TaskIns(meta, instruction)

    def fail(self, node: NodeRecord, task_id: int, error: BaseException) -> None:
        """End task ``task_id`` of ``node`` with ``error`` (e.g. it cannot be sent)."""
        node.flower_tasks.pop(task_id, None)
        node.mailbox.fail(task_id, error)

    def _task_of(self, node: NodeRecord, flower_id: str) -> int | None:
        for task_id, known in node.flower_tasks.items():
            if known == flower_id:
                return task_id
        return None

    def _push(self, request: object, caller: Caller) -> FlowerStep:
        push = _expect(PushTaskResRequest, request)
        record = self.lookup(push.node, caller)
        results: dict[str, int] = {}
        refused: list[str] = []
        for item in push.task_res_list:
            meta = item.meta
            if meta.producer.node_id != record.node_id:
                raise FleetError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"TaskRes from node {meta.producer.node_id} pushed by node {record.node_id}",
                )
            results[_random_task_id()] = 0
            task_id = self._task_of(record, meta.ancestry[0]) if meta.ancestry else None
            task = None if task_id is None else record.mailbox.in_flight(task_id)
            if task_id is None or task is None:
                continue  # a reply to a task that ended already (late): discarded
            problem = self._take(record, task_id, task, item)
            if problem is not None:
                refused.append(problem)
        if refused:
            raise FleetError(ErrorKind.INVALID_ARGUMENT, "; ".join(refused))
        return FlowerRespond(PushTaskResResponse(results=results))

    def _take(
        self, node: NodeRecord, task_id: int, task: Task, item: TaskRes | UnreadableTask
    ) -> str | None:
        """End ``task`` with the pushed ``item``; the reason it was refused, if it was."""
        node.flower_tasks.pop(task_id, None)
        if isinstance(item, TaskRes) and item.reply is not None:
            node.mailbox.deliver(task_id, item.reply)
            return None
        if isinstance(item, TaskRes) and item.error is not None:
            error = item.error
            node.mailbox.fail(
                task_id,
                ClientAppError(
                    f"node {node.node_id}: the Flower node answered with error code "
                    f"{error.code}: {error.reason}"
                ),
            )
            return None
        assert isinstance(item, UnreadableTask)
        if item.meta.message_type == RECONNECT and isinstance(task.instruction, ReconnectIns):
            node.mailbox.deliver(task_id, DisconnectRes(Reason.RECONNECT.name))
            self.state.close(node, None)  # it acknowledged the end of its session
            return None
        reason = f"TaskRes {item.meta.ancestry[:1]}: {item.reason}"
        node.mailbox.fail(task_id, DecodeError(f"node {node.node_id}: {reason}"))
        return reason

    # --- runs --------------------------------------------------------------------------

    def _get_run(self, request: object, caller: Caller) -> FlowerStep:
        get = _expect(GetRunRequest, request)
        self.lookup(get.node, caller)
        if get.run_id != self.run_id:
            raise FleetError(
                ErrorKind.UNKNOWN_NODE,
                f"run {get.run_id} is not this server's run (its tasks carry run {self.run_id})",
            )
        return FlowerRespond(GetRunResponse(Run(run_id=self.run_id)))

    def _get_fab(self, request: object, caller: Caller) -> FlowerStep:
        get = _expect(GetFabRequest, request)
        self.lookup(get.node, caller)
        raise FleetError(
            ErrorKind.UNKNOWN_NODE,
            f"no app bundle (FAB) {get.hash_str!r}: this Stamen server runs a legacy run, "
            "whose GetRun names no FAB",
        )


FLOWER_TRANSITIONS: dict[str, Callable[[FlowerLink, object, Caller], FlowerStep]] = {
    "CREATE_NODE": FlowerLink._create_node,
    "DELETE_NODE": FlowerLink._delete_node,
    "PING": FlowerLink._ping,
    "PULL_TASK_INS": FlowerLink._pull,
    "PUSH_TASK_RES": FlowerLink._push,
    "GET_RUN": FlowerLink._get_run,
    "GET_FAB": FlowerLink._get_fab,
}
"""Flower 1.12's Fleet API: each call's name and the transition that serves it."""
