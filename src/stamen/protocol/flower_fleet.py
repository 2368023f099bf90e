"""Flower 1.12's Fleet API as plain data (sans-IO; no protobuf: see ``wire/flower_codec``).

A Flower SuperNode registers (CreateNode), pings, pulls ``TaskIns`` and pushes ``TaskRes``;
it asks for its run (GetRun) and the run's app bundle (GetFab), and leaves (DeleteNode).
A task carries Flower's metadata (:class:`TaskMeta`) and, in Stamen, the classic message
it holds: an :data:`~stamen.messages.Instruction` in a :class:`TaskIns`, a
:data:`~stamen.messages.Reply` (or Flower's :class:`FlowerError`) in a :class:`TaskRes`.
The message type names the kind (:data:`LEGACY_MESSAGE_TYPES`); a task Stamen cannot read
(another message type, or a RecordSet without the records of Flower's legacy conversion)
decodes as :class:`UnreadableTask`, so the shell can answer or count it.

Towards a Flower peer only status codes Flower 1.12 knows travel (it reads unknown codes
as OK): :func:`reply_for_flower_peer`.

(Longer than most modules: one validated dataclass per message of the API, in one place.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TypeAlias

from ..errors import ConfigError
from ..messages import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Reply,
    Status,
    check_scalar_mapping,
)
from ..typing import Scalar

__all__ = [
    "ANONYMOUS",
    "EVALUATE",
    "GET_PARAMETERS",
    "GET_PROPERTIES",
    "LEGACY_MESSAGE_TYPES",
    "QUERY",
    "RECONNECT",
    "TRAIN",
    "CreateNodeRequest",
    "CreateNodeResponse",
    "DeleteNodeRequest",
    "DeleteNodeResponse",
    "ErrorCode",
    "Fab",
    "FlowerError",
    "GetFabRequest",
    "GetFabResponse",
    "GetRunRequest",
    "GetRunResponse",
    "LegacyInstruction",
    "LegacyReply",
    "Node",
    "PingRequest",
    "PingResponse",
    "PullTaskInsRequest",
    "PullTaskInsResponse",
    "PushTaskResRequest",
    "PushTaskResResponse",
    "Reconnect",
    "ReconnectTask",
    "Run",
    "TaskIns",
    "TaskMeta",
    "TaskRes",
    "UnreadableTask",
    "message_type_of",
    "reply_for_flower_peer",
]

_UINT64_MAX = 2**64 - 1
_UINT32_MAX = 2**32 - 1

TRAIN = "train"
EVALUATE = "evaluate"
GET_PARAMETERS = "get_parameters"
GET_PROPERTIES = "get_properties"
QUERY = "query"
"""Flower's message type for a RecordSet query (not a legacy message: Stamen cannot run it)."""

RECONNECT = "reconnect"
"""The message type of a control message: a ``ReconnectIns`` in a TaskIns (configs record
``config`` = ``{"seconds": n}``), answered by a TaskRes of the same type (configs record
``config`` = ``{"reason": int}``). Flower 1.12's SuperLink never sends one; Flower 1.12's
node handles it as its grpc-bidi client handles ``ReconnectIns``: it pushes the answer,
unregisters (DeleteNode) and, for ``seconds == 0``, ``start_client`` returns."""

LEGACY_MESSAGE_TYPES = (TRAIN, EVALUATE, GET_PARAMETERS, GET_PROPERTIES)
"""The message types of Flower's legacy conversion, which Stamen reads and writes."""

LegacyInstruction: TypeAlias = FitIns | EvaluateIns | GetParametersIns | GetPropertiesIns
"""An instruction that travels as a TaskIns (a Flower SuperLink never sends ReconnectIns
over the Fleet API: its legacy server's ``reconnect`` does nothing)."""

LegacyReply: TypeAlias = FitRes | EvaluateRes | GetParametersRes | GetPropertiesRes
"""A reply that travels as a TaskRes."""

_TYPE_OF: dict[type, str] = {
    FitIns: TRAIN,
    FitRes: TRAIN,
    EvaluateIns: EVALUATE,
    EvaluateRes: EVALUATE,
    GetParametersIns: GET_PARAMETERS,
    GetParametersRes: GET_PARAMETERS,
    GetPropertiesIns: GET_PROPERTIES,
    GetPropertiesRes: GET_PROPERTIES,
}


def message_type_of(message: Instruction | Reply) -> str:
    """Flower's message type of a classic message (``FitIns`` and ``FitRes`` -> ``"train"``).

    Raises:
        ConfigError: the message has no Fleet API form (ReconnectIns, DisconnectRes).
    """
    try:
        return _TYPE_OF[type(message)]
    except KeyError:
        raise ConfigError(
            f"message: expected one of {sorted(t.__name__ for t in _TYPE_OF)}, received "
            f"{type(message).__name__} (it has no form in Flower's Fleet API)"
        ) from None


def reply_for_flower_peer(reply: Reply) -> Reply:
    """``reply`` with only a status code a Flower 1.12 server knows.

    Flower 1.12 knows codes 0-4 and reads any other code (Stamen's ``CLIENT_ERROR`` = 5)
    as OK: it would aggregate a failed FitRes (no parameters, 0 examples) as a result,
    turning the global model into ``[]``, and divide by zero when every node failed. A
    ``CLIENT_ERROR`` reply therefore goes to a Flower peer with the code Flower 1.12 knows
    as non-OK for that kind of reply (``FIT_NOT_IMPLEMENTED`` for a FitRes,
    ``EVALUATE_NOT_IMPLEMENTED``, ``GET_PARAMETERS_NOT_IMPLEMENTED``,
    ``GET_PROPERTIES_NOT_IMPLEMENTED``), the status message unchanged (it names the error).
    Flower's server counts any non-OK FitRes/EvaluateRes as exactly one failure of that
    round and keeps the stream (so the node takes part in the next round); when every node
    fails, FedAvg has no result and the model stays as it was. A Flower 1.12 node in the
    same situation crashes and drops its stream, which Flower also counts as one failure,
    but the node is then gone for the following rounds.

    Every other reply is returned equal to itself.
    """
    if isinstance(reply, FitRes):
        return replace(reply, status=_flower_status(reply.status, Code.FIT_NOT_IMPLEMENTED))
    if isinstance(reply, EvaluateRes):
        return replace(reply, status=_flower_status(reply.status, Code.EVALUATE_NOT_IMPLEMENTED))
    if isinstance(reply, GetParametersRes):
        code = Code.GET_PARAMETERS_NOT_IMPLEMENTED
        return replace(reply, status=_flower_status(reply.status, code))
    if isinstance(reply, GetPropertiesRes):
        code = Code.GET_PROPERTIES_NOT_IMPLEMENTED
        return replace(reply, status=_flower_status(reply.status, code))
    return reply


def _flower_status(status: Status, failure: Code) -> Status:
    if status.code is not Code.CLIENT_ERROR:
        return status
    return Status(code=failure, message=status.message)


class ErrorCode(IntEnum):
    """Flower 1.12's codes of a task's :class:`FlowerError`."""

    UNKNOWN = 0
    LOAD_CLIENT_APP_EXCEPTION = 1
    CLIENT_APP_RAISED_EXCEPTION = 2
    NODE_UNAVAILABLE = 3


# --- validation --------------------------------------------------------------------------


def _name(value: object) -> str:
    return type(value).__name__


def _check_uint(where: str, value: object, maximum: int = _UINT64_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected int, received {_name(value)} ({value!r:.60})")
    if not 0 <= value <= maximum:
        raise ConfigError(f"{where}: expected an int in [0, {maximum}], received {value}")


def _check_sint(where: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected int, received {_name(value)} ({value!r:.60})")
    if not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where}: expected an int in [-2**63, 2**63 - 1], received {value}")


def _check_float(where: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise ConfigError(f"{where}: expected float, received {_name(value)} ({value!r:.60})")


def _check_finite(where: str, value: object) -> None:
    _check_float(where, value)
    assert isinstance(value, float | int)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: expected a finite number >= 0, received {value}")


def _check_str(where: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected str, received {_name(value)} ({value!r:.60})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where}: expected text encodable as UTF-8, received {value!r:.60}"
        ) from exc


def _check_bool(where: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected bool, received {_name(value)} ({value!r:.60})")


def _check_is(where: str, value: object, expected: type) -> None:
    if not isinstance(value, expected):
        raise ConfigError(
            f"{where}: expected {expected.__name__}, received {_name(value)} ({value!r:.60})"
        )


def _check_tuple(where: str, value: object, *items: type) -> None:
    names = " or ".join(item.__name__ for item in items)
    if not isinstance(value, tuple):
        raise ConfigError(f"{where}: expected a tuple of {names}, received {_name(value)}")
    for index, element in enumerate(value):
        if items == (str,):
            _check_str(f"{where}[{index}]", element)
        elif not isinstance(element, items):
            raise ConfigError(
                f"{where}[{index}]: expected {names}, received {_name(element)} ({element!r:.60})"
            )


# --- nodes, errors, tasks ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """A node of the federation; ``anonymous`` marks the SuperLink's side of a task."""

    node_id: int
    anonymous: bool = False

    def __post_init__(self) -> None:
        _check_uint("Node.node_id", self.node_id)
        _check_bool("Node.anonymous", self.anonymous)


ANONYMOUS = Node(node_id=0, anonymous=True)
"""The producer of a TaskIns and the consumer of a TaskRes: the SuperLink's side."""


@dataclass(frozen=True, slots=True)
class FlowerError:
    """Why a task gave no result: a Flower :class:`ErrorCode` (or another int) and text."""

    code: int
    reason: str

    def __post_init__(self) -> None:
        _check_sint("FlowerError.code", self.code)
        _check_str("FlowerError.reason", self.reason)


@dataclass(frozen=True, slots=True)
class TaskMeta:
    """Flower's metadata of a task (everything of a TaskIns/TaskRes but its content).

    ``message_type`` is Flower's ``task_type`` (``"train"``, ``"evaluate"``, ...);
    ``created_at``/``pushed_at`` are seconds since the epoch, ``ttl`` seconds from
    ``created_at``; ``ancestry`` holds the id of the TaskIns a TaskRes answers.
    """

    task_id: str
    run_id: int
    message_type: str
    group_id: str = ""
    producer: Node = ANONYMOUS
    consumer: Node = ANONYMOUS
    created_at: float = 0.0
    delivered_at: str = ""
    pushed_at: float = 0.0
    ttl: float = 0.0
    ancestry: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_str("TaskMeta.task_id", self.task_id)
        _check_uint("TaskMeta.run_id", self.run_id)
        _check_str("TaskMeta.message_type", self.message_type)
        _check_str("TaskMeta.group_id", self.group_id)
        _check_is("TaskMeta.producer", self.producer, Node)
        _check_is("TaskMeta.consumer", self.consumer, Node)
        _check_float("TaskMeta.created_at", self.created_at)
        _check_str("TaskMeta.delivered_at", self.delivered_at)
        _check_float("TaskMeta.pushed_at", self.pushed_at)
        _check_float("TaskMeta.ttl", self.ttl)
        _check_tuple("TaskMeta.ancestry", self.ancestry, str)


@dataclass(frozen=True, slots=True)
class TaskIns:
    """An instruction from the SuperLink to one node.

    ``meta.message_type`` must be the instruction's (:func:`message_type_of`).
    """

    meta: TaskMeta
    instruction: LegacyInstruction

    def __post_init__(self) -> None:
        _check_is("TaskIns.meta", self.meta, TaskMeta)
        expected = message_type_of(self.instruction)
        if self.meta.message_type != expected:
            raise ConfigError(
                f"TaskIns.meta.message_type: expected {expected!r} for "
                f"{_name(self.instruction)}, received {self.meta.message_type!r}"
            )


@dataclass(frozen=True, slots=True)
class TaskRes:
    """A node's answer to a TaskIns: a reply, or Flower's error (exactly one of them).

    With a reply, ``meta.message_type`` must be the reply's (:func:`message_type_of`).
    """

    meta: TaskMeta
    reply: LegacyReply | None = None
    error: FlowerError | None = None

    def __post_init__(self) -> None:
        _check_is("TaskRes.meta", self.meta, TaskMeta)
        if (self.reply is None) == (self.error is None):
            raise ConfigError(
                "TaskRes: expected exactly one of reply and error, received "
                + ("both" if self.reply is not None else "neither")
            )
        if self.reply is None:  # then error is set (checked just above)
            _check_is("TaskRes.error", self.error, FlowerError)
            return
        expected = message_type_of(self.reply)
        if self.meta.message_type != expected:
            raise ConfigError(
                f"TaskRes.meta.message_type: expected {expected!r} for {_name(self.reply)}, "
                f"received {self.meta.message_type!r}"
            )


@dataclass(frozen=True, slots=True)
class UnreadableTask:
    """A TaskIns or TaskRes whose content Stamen cannot turn into a classic message (a
    message type other than the legacy ones, or a RecordSet without their records);
    ``reason`` says what was expected and what was received."""

    meta: TaskMeta
    reason: str

    def __post_init__(self) -> None:
        _check_is("UnreadableTask.meta", self.meta, TaskMeta)
        _check_str("UnreadableTask.reason", self.reason)


# --- runs and FABs -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """A run: its id, app bundle (FAB) id/version/hash and configuration overrides."""

    run_id: int
    fab_id: str = ""
    fab_version: str = ""
    override_config: Mapping[str, Scalar] = field(default_factory=dict)
    fab_hash: str = ""

    def __post_init__(self) -> None:
        _check_uint("Run.run_id", self.run_id)
        _check_str("Run.fab_id", self.fab_id)
        _check_str("Run.fab_version", self.fab_version)
        check_scalar_mapping("Run.override_config", self.override_config)
        _check_str("Run.fab_hash", self.fab_hash)


@dataclass(frozen=True, slots=True)
class Fab:
    """A Flower app bundle: its hash and its bytes."""

    hash_str: str
    content: bytes

    def __post_init__(self) -> None:
        _check_str("Fab.hash_str", self.hash_str)
        _check_is("Fab.content", self.content, bytes)


# --- the calls -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateNodeRequest:
    """Register a node that will ping every ``ping_interval`` seconds."""

    ping_interval: float

    def __post_init__(self) -> None:
        _check_finite("CreateNodeRequest.ping_interval", self.ping_interval)


@dataclass(frozen=True, slots=True)
class CreateNodeResponse:
    """The registered node (its id)."""

    node: Node

    def __post_init__(self) -> None:
        _check_is("CreateNodeResponse.node", self.node, Node)


@dataclass(frozen=True, slots=True)
class DeleteNodeRequest:
    """Unregister ``node``."""

    node: Node

    def __post_init__(self) -> None:
        _check_is("DeleteNodeRequest.node", self.node, Node)


@dataclass(frozen=True, slots=True)
class DeleteNodeResponse:
    """Empty."""


@dataclass(frozen=True, slots=True)
class PingRequest:
    """``node`` is alive, and will ping again within ``ping_interval`` seconds."""

    node: Node
    ping_interval: float

    def __post_init__(self) -> None:
        _check_is("PingRequest.node", self.node, Node)
        _check_finite("PingRequest.ping_interval", self.ping_interval)


@dataclass(frozen=True, slots=True)
class PingResponse:
    """Whether the SuperLink knew the node."""

    success: bool

    def __post_init__(self) -> None:
        _check_bool("PingResponse.success", self.success)


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Flower's hint to reconnect after ``reconnect`` seconds (Flower 1.12 nodes ignore it)."""

    reconnect: int

    def __post_init__(self) -> None:
        _check_uint("Reconnect.reconnect", self.reconnect)


@dataclass(frozen=True, slots=True)
class PullTaskInsRequest:
    """Ask for ``node``'s next tasks (``task_ids`` empty: any)."""

    node: Node
    task_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_is("PullTaskInsRequest.node", self.node, Node)
        _check_tuple("PullTaskInsRequest.task_ids", self.task_ids, str)


@dataclass(frozen=True, slots=True)
class PullTaskInsResponse:
    """Zero or more tasks for the node (each readable, or an :class:`UnreadableTask`)."""

    task_ins_list: tuple[TaskIns | UnreadableTask, ...] = ()
    reconnect: Reconnect | None = None

    def __post_init__(self) -> None:
        _check_tuple(
            "PullTaskInsResponse.task_ins_list", self.task_ins_list, TaskIns, UnreadableTask
        )
        if self.reconnect is not None:
            _check_is("PullTaskInsResponse.reconnect", self.reconnect, Reconnect)


@dataclass(frozen=True, slots=True)
class PushTaskResRequest:
    """``node``'s answers (each readable, or an :class:`UnreadableTask` once received)."""

    node: Node
    task_res_list: tuple[TaskRes | UnreadableTask, ...]

    def __post_init__(self) -> None:
        _check_is("PushTaskResRequest.node", self.node, Node)
        _check_tuple(
            "PushTaskResRequest.task_res_list", self.task_res_list, TaskRes, UnreadableTask
        )


@dataclass(frozen=True, slots=True)
class PushTaskResResponse:
    """Per pushed task id, a count (Flower's SuperLink answers 0 for each)."""

    results: Mapping[str, int] = field(default_factory=dict)
    reconnect: Reconnect | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.results, Mapping):
            raise ConfigError(
                "PushTaskResResponse.results: expected a dict of str to int, received "
                f"{_name(self.results)}"
            )
        for key, value in self.results.items():
            _check_str("PushTaskResResponse.results key", key)
            _check_uint(f"PushTaskResResponse.results[{key!r}]", value, _UINT32_MAX)
        if self.reconnect is not None:
            _check_is("PushTaskResResponse.reconnect", self.reconnect, Reconnect)


@dataclass(frozen=True, slots=True)
class GetRunRequest:
    """Ask for run ``run_id``."""

    node: Node
    run_id: int

    def __post_init__(self) -> None:
        _check_is("GetRunRequest.node", self.node, Node)
        _check_uint("GetRunRequest.run_id", self.run_id)


@dataclass(frozen=True, slots=True)
class GetRunResponse:
    """The run asked for."""

    run: Run

    def __post_init__(self) -> None:
        _check_is("GetRunResponse.run", self.run, Run)


@dataclass(frozen=True, slots=True)
class GetFabRequest:
    """Ask for the app bundle whose hash is ``hash_str``."""

    node: Node
    hash_str: str

    def __post_init__(self) -> None:
        _check_is("GetFabRequest.node", self.node, Node)
        _check_str("GetFabRequest.hash_str", self.hash_str)


@dataclass(frozen=True, slots=True)
class GetFabResponse:
    """The app bundle asked for."""

    fab: Fab

    def __post_init__(self) -> None:
        _check_is("GetFabResponse.fab", self.fab, Fab)


@dataclass(frozen=True, slots=True)
class ReconnectTask:
    """A TaskIns of type :data:`RECONNECT`: ``ReconnectIns(seconds)`` for one node.

    ``meta.message_type`` must be :data:`RECONNECT`; ``seconds`` 0 ends the node's session.
    """

    meta: TaskMeta
    seconds: int = 0

    def __post_init__(self) -> None:
        _check_is("ReconnectTask.meta", self.meta, TaskMeta)
        if self.meta.message_type != RECONNECT:
            raise ConfigError(
                f"ReconnectTask.meta.message_type: expected {RECONNECT!r}, received "
                f"{self.meta.message_type!r}"
            )
        _check_sint("ReconnectTask.seconds", self.seconds)
