"""Encode and decode Flower 1.12's Fleet API messages (``stamen_flower_fleet.proto``).

Requests and responses are the dataclasses of :mod:`stamen.protocol.flower_fleet`. A
task's RecordSet is converted to and from Stamen's classic messages exactly as Flower
1.12's legacy conversion does it:

* ``FitIns`` <-> parameters record ``fitins.parameters`` + configs record ``fitins.config``
  (``evaluateins.*`` alike); ``GetParametersIns``/``GetPropertiesIns`` <-> configs record
  ``getparametersins.config`` / ``getpropertiesins.config``;
* ``FitRes`` <-> ``fitres.parameters``, metrics record ``fitres.num_examples``
  (``{"num_examples": int}``), configs records ``fitres.metrics`` and ``fitres.status``
  (``{"code": int, "message": str}``); ``EvaluateRes`` <-> metrics records
  ``evaluateres.loss`` (``{"loss": double}``: 64 bits here, unlike grpc-bidi's float) and
  ``evaluateres.num_examples``, configs ``evaluateres.metrics`` and ``evaluateres.status``;
  ``GetParametersRes`` <-> ``getparametersres.parameters`` + ``.status``;
  ``GetPropertiesRes`` <-> configs ``getpropertiesres.properties`` + ``.status``;
* tensors: one ``Array`` per tensor under keys ``"0"``, ``"1"``, ... with ``stype`` = the
  tensor type, ``data`` = the tensor's bytes (``.npy`` for ``numpy.ndarray``), ``dtype``
  and ``shape`` left empty (as Flower's conversion leaves them); no tensor: one Array
  under ``"_empty"`` carrying only the tensor type. Read back, the tensor type is the
  first non-empty ``stype``; ``.npy`` bytes are kept as they are (never re-encoded), after
  checking their header (no pickle, no object dtype, the size the header announces) and,
  when the Array states them, its dtype and shape.

Scalars: bool, int (``sint64``, or ``uint64`` above 2**63 - 1), float (double), str and
bytes travel as themselves; list values, which have no classic form, make a task
unreadable. A task whose content Stamen cannot read decodes as
:class:`~stamen.protocol.flower_fleet.UnreadableTask` (its reason says what was expected
and received); bytes that are not the message at all raise
:class:`~stamen.errors.DecodeError`. Replies are encoded through
:func:`~stamen.protocol.flower_fleet.reply_for_flower_peer`, so only status codes Flower
knows leave.

(Longer than most modules: it is the whole of one API, an encoder and a decoder for each
of its fourteen messages beside the legacy conversion they share.)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from numpy.lib import format as npy_format

from ..errors import ConfigError, DecodeError
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
    Parameters,
    Status,
)
from ..protocol.flower_fleet import (
    EVALUATE,
    GET_PARAMETERS,
    LEGACY_MESSAGE_TYPES,
    TRAIN,
    CreateNodeRequest,
    CreateNodeResponse,
    DeleteNodeRequest,
    DeleteNodeResponse,
    Fab,
    FlowerError,
    GetFabRequest,
    GetFabResponse,
    GetRunRequest,
    GetRunResponse,
    LegacyInstruction,
    LegacyReply,
    Node,
    PingRequest,
    PingResponse,
    PullTaskInsRequest,
    PullTaskInsResponse,
    PushTaskResRequest,
    PushTaskResResponse,
    Reconnect,
    ReconnectTask,
    Run,
    TaskIns,
    TaskMeta,
    TaskRes,
    UnreadableTask,
    reply_for_flower_peer,
)
from ..typing import Scalar
from ._pb import stamen_flower_fleet_pb2 as pb

__all__ = [
    "EMPTY_TENSOR_KEY",
    "NUMPY_STYPE",
    "decode_create_node_request",
    "decode_create_node_response",
    "decode_delete_node_request",
    "decode_delete_node_response",
    "decode_get_fab_request",
    "decode_get_fab_response",
    "decode_get_run_request",
    "decode_get_run_response",
    "decode_ping_request",
    "decode_ping_response",
    "decode_pull_task_ins_request",
    "decode_pull_task_ins_response",
    "decode_push_task_res_request",
    "decode_push_task_res_response",
    "deterministic_request",
    "encode_create_node_request",
    "encode_create_node_response",
    "encode_delete_node_request",
    "encode_delete_node_response",
    "encode_get_fab_request",
    "encode_get_fab_response",
    "encode_get_run_request",
    "encode_get_run_response",
    "encode_ping_request",
    "encode_ping_response",
    "encode_pull_task_ins_request",
    "encode_pull_task_ins_response",
    "encode_push_task_res_request",
    "encode_push_task_res_response",
    "encode_reconnect_pull_response",
]

Data = bytes | bytearray | memoryview

EMPTY_TENSOR_KEY = "_empty"
"""Key of the one tensor-less Array that carries the tensor type of empty Parameters."""

NUMPY_STYPE = "numpy.ndarray"
"""The ``stype`` (tensor type) of ``.npy`` tensors."""

_INT64_MAX = 2**63 - 1
_T = TypeVar("_T")


class _Unreadable(Exception):
    """A task's content has no classic form; the message says why."""


def _parse(message: Any, data: Data, build: Callable[[Any], _T]) -> _T:
    try:
        message.ParseFromString(bytes(data))
        return build(message)
    except DecodeError:
        raise
    except Exception as exc:  # protobuf and validators: bad bytes either way
        name = message.DESCRIPTOR.name
        raise DecodeError(f"invalid {name} ({len(data)} bytes): {exc}") from exc


# --- scalars and records -------------------------------------------------------------------


def _put_int(slot: Any, value: int) -> None:
    if value > _INT64_MAX:
        slot.uint64 = value
    else:
        slot.sint64 = value


def _put_configs(record: Any, values: Mapping[str, Scalar]) -> None:
    record.SetInParent()
    _put_scalars(record.data, values)  # a ConfigsRecord value has a Scalar's fields


def _get_configs(where: str, record: Any) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, slot in record.data.items():
        kind = slot.WhichOneof("value")
        if kind is None or kind.endswith("_list"):
            raise _Unreadable(
                f"{where}[{key!r}]: expected a bool, int, float, str or bytes value, "
                f"received {kind or 'no value'}"
            )
        out[key] = getattr(slot, kind)
    return out


def _get_metric(where: str, records: Any, name: str, key: str) -> int | float:
    record = _record(where, records, name, "metrics")
    if key not in record.data:
        raise _Unreadable(
            f"{where}: expected metrics record {name!r} to hold {key!r}, received keys "
            f"{sorted(record.data)}"
        )
    slot = record.data[key]
    kind = slot.WhichOneof("value")
    if kind not in ("double", "sint64", "uint64"):
        raise _Unreadable(
            f"{where}: metrics record {name!r}[{key!r}]: expected a number, received "
            f"{kind or 'no value'}"
        )
    value: int | float = getattr(slot, kind)
    return value


def _record(where: str, records: Any, name: str, kind: str) -> Any:
    if name not in records:
        raise _Unreadable(
            f"{where}: expected {kind} record {name!r}, received {kind} records {sorted(records)}"
        )
    return records[name]


# --- tensors -------------------------------------------------------------------------------


def _put_parameters(record: Any, parameters: Parameters) -> None:
    record.SetInParent()
    if not parameters.tensors:
        record.data_keys.append(EMPTY_TENSOR_KEY)
        record.data_values.add(stype=parameters.tensor_type)
        return
    for index, tensor in enumerate(parameters.tensors):
        record.data_keys.append(str(index))
        record.data_values.add(stype=parameters.tensor_type, data=bytes(tensor))


def _check_npy(where: str, array: Any) -> None:
    """Raise _Unreadable unless ``array.data`` is a pickle-free ``.npy`` of the size its
    header announces and, if ``array`` states them, of its dtype and shape."""
    data: bytes = array.data
    stream = io.BytesIO(data)  # shares ``data``'s buffer: no copy
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"expected .npy format version 1.0 or 2.0, received {version}")
    except (ValueError, SyntaxError, TypeError, OverflowError) as exc:
        raise _Unreadable(
            f"{where}: expected .npy bytes, received {len(data)} bytes: {exc}"
        ) from exc
    if dtype.hasobject:
        raise _Unreadable(f"{where}: expected a dtype without Python objects, received {dtype}")
    size = stream.tell() + dtype.itemsize * math.prod(shape)
    if size != len(data):
        raise _Unreadable(
            f"{where}: expected {size} bytes for a {dtype} array of shape {shape}, "
            f"received {len(data)}"
        )
    if array.dtype and (array.dtype != str(dtype) or tuple(array.shape) != shape):
        raise _Unreadable(
            f"{where}: expected the .npy header's dtype {dtype} and shape {shape}, the Array "
            f"states dtype {array.dtype!r} and shape {tuple(array.shape)}"
        )


def _get_parameters(where: str, records: Any, name: str) -> Parameters:
    record = _record(where, records, name, "parameters")
    keys, arrays = record.data_keys, record.data_values
    if len(keys) != len(arrays):
        raise _Unreadable(
            f"{where}: parameters record {name!r}: expected as many keys as arrays, received "
            f"{len(keys)} keys and {len(arrays)} arrays"
        )
    if len(set(keys)) != len(keys):
        raise _Unreadable(f"{where}: parameters record {name!r}: expected unique keys")
    tensors: list[bytes | memoryview] = []
    tensor_type = ""
    for key, array in zip(keys, arrays, strict=True):
        if key != EMPTY_TENSOR_KEY:
            if array.stype == NUMPY_STYPE:
                _check_npy(f"{where}: {name}[{key!r}]", array)
            tensors.append(array.data)
        if not tensor_type:
            tensor_type = array.stype
    return Parameters(tensors=tensors, tensor_type=tensor_type)


# --- status --------------------------------------------------------------------------------


def _put_status(records: Any, name: str, status: Status) -> None:
    record = records[name]
    record.SetInParent()
    record.data["code"].sint64 = int(status.code)
    record.data["message"].string = status.message


def _get_status(where: str, records: Any, name: str) -> Status:
    values = _get_configs(f"{where}: {name}", _record(where, records, name, "configs"))
    code, message = values.get("code"), values.get("message")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        raise _Unreadable(
            f"{where}: configs record {name!r}: expected an int 'code' and a str 'message', "
            f"received {values!r:.200}"
        )
    try:
        return Status(code=Code(code), message=message)
    except ValueError:
        raise _Unreadable(
            f"{where}: {name}['code']: expected one of {[int(c) for c in Code]}, received {code}"
        ) from None


# --- instructions and replies <-> RecordSets -----------------------------------------------


def _put_instruction(recordset: Any, instruction: LegacyInstruction) -> None:
    recordset.SetInParent()
    if isinstance(instruction, FitIns | EvaluateIns):
        prefix = "fitins" if isinstance(instruction, FitIns) else "evaluateins"
        _put_parameters(recordset.parameters[f"{prefix}.parameters"], instruction.parameters)
        _put_configs(recordset.configs[f"{prefix}.config"], instruction.config)
    elif isinstance(instruction, GetParametersIns):
        _put_configs(recordset.configs["getparametersins.config"], instruction.config)
    else:
        _put_configs(recordset.configs["getpropertiesins.config"], instruction.config)


def _get_instruction(message_type: str, recordset: Any) -> LegacyInstruction:
    where = f"TaskIns of type {message_type!r}"
    configs, parameters = recordset.configs, recordset.parameters
    if message_type == TRAIN:
        return FitIns(
            _get_parameters(where, parameters, "fitins.parameters"),
            _get_configs(
                f"{where}: fitins.config", _record(where, configs, "fitins.config", "configs")
            ),
        )
    if message_type == EVALUATE:
        name = "evaluateins.config"
        return EvaluateIns(
            _get_parameters(where, parameters, "evaluateins.parameters"),
            _get_configs(f"{where}: {name}", _record(where, configs, name, "configs")),
        )
    if message_type == GET_PARAMETERS:
        name = "getparametersins.config"
        return GetParametersIns(
            _get_configs(f"{where}: {name}", _record(where, configs, name, "configs"))
        )
    name = "getpropertiesins.config"
    return GetPropertiesIns(
        _get_configs(f"{where}: {name}", _record(where, configs, name, "configs"))
    )


def _put_reply(recordset: Any, reply: LegacyReply) -> None:
    recordset.SetInParent()
    configs, metrics = recordset.configs, recordset.metrics
    if isinstance(reply, FitRes):
        _put_parameters(recordset.parameters["fitres.parameters"], reply.parameters)
        _put_int(metrics["fitres.num_examples"].data["num_examples"], reply.num_examples)
        _put_configs(configs["fitres.metrics"], reply.metrics)
        _put_status(configs, "fitres.status", reply.status)
    elif isinstance(reply, EvaluateRes):
        metrics["evaluateres.loss"].data["loss"].double = float(reply.loss)
        _put_int(metrics["evaluateres.num_examples"].data["num_examples"], reply.num_examples)
        _put_configs(configs["evaluateres.metrics"], reply.metrics)
        _put_status(configs, "evaluateres.status", reply.status)
    elif isinstance(reply, GetParametersRes):
        _put_parameters(recordset.parameters["getparametersres.parameters"], reply.parameters)
        _put_status(configs, "getparametersres.status", reply.status)
    else:
        _put_configs(configs["getpropertiesres.properties"], reply.properties)
        _put_status(configs, "getpropertiesres.status", reply.status)


def _get_int(where: str, value: int | float) -> int:
    if not isinstance(value, int):
        raise _Unreadable(f"{where}: expected an int, received {type(value).__name__} {value!r}")
    return value


def _get_reply(message_type: str, recordset: Any) -> LegacyReply:
    where = f"TaskRes of type {message_type!r}"
    configs, metrics = recordset.configs, recordset.metrics
    if message_type == TRAIN:
        return FitRes(
            status=_get_status(where, configs, "fitres.status"),
            parameters=_get_parameters(where, recordset.parameters, "fitres.parameters"),
            num_examples=_get_int(
                f"{where}: fitres.num_examples",
                _get_metric(where, metrics, "fitres.num_examples", "num_examples"),
            ),
            metrics=_get_configs(
                f"{where}: fitres.metrics", _record(where, configs, "fitres.metrics", "configs")
            ),
        )
    if message_type == EVALUATE:
        return EvaluateRes(
            status=_get_status(where, configs, "evaluateres.status"),
            loss=float(_get_metric(where, metrics, "evaluateres.loss", "loss")),
            num_examples=_get_int(
                f"{where}: evaluateres.num_examples",
                _get_metric(where, metrics, "evaluateres.num_examples", "num_examples"),
            ),
            metrics=_get_configs(
                f"{where}: evaluateres.metrics",
                _record(where, configs, "evaluateres.metrics", "configs"),
            ),
        )
    if message_type == GET_PARAMETERS:
        return GetParametersRes(
            status=_get_status(where, configs, "getparametersres.status"),
            parameters=_get_parameters(where, recordset.parameters, "getparametersres.parameters"),
        )
    name = "getpropertiesres.properties"
    return GetPropertiesRes(
        status=_get_status(where, configs, "getpropertiesres.status"),
        properties=_get_configs(f"{where}: {name}", _record(where, configs, name, "configs")),
    )


# --- tasks ---------------------------------------------------------------------------------


def _put_node(target: Any, node: Node) -> None:
    target.SetInParent()
    target.node_id = node.node_id
    target.anonymous = node.anonymous


def _get_node(source: Any) -> Node:
    return Node(node_id=source.node_id, anonymous=source.anonymous)


def _put_meta(target: Any, meta: TaskMeta) -> Any:
    target.task_id = meta.task_id
    target.group_id = meta.group_id
    target.run_id = meta.run_id
    task = target.task
    _put_node(task.producer, meta.producer)
    _put_node(task.consumer, meta.consumer)
    task.created_at = meta.created_at
    task.delivered_at = meta.delivered_at
    task.pushed_at = meta.pushed_at
    task.ttl = meta.ttl
    task.ancestry.extend(meta.ancestry)
    task.task_type = meta.message_type
    return task


def _get_meta(source: Any, name: str) -> TaskMeta:
    if not source.HasField("task"):
        raise DecodeError(f"{name} {source.task_id!r}: expected a task, received none")
    task = source.task
    return TaskMeta(
        task_id=source.task_id,
        run_id=source.run_id,
        message_type=task.task_type,
        group_id=source.group_id,
        producer=_get_node(task.producer),
        consumer=_get_node(task.consumer),
        created_at=task.created_at,
        delivered_at=task.delivered_at,
        pushed_at=task.pushed_at,
        ttl=task.ttl,
        ancestry=tuple(task.ancestry),
    )


def _unreadable_type(meta: TaskMeta) -> str:
    return (
        f"task type: expected one of {list(LEGACY_MESSAGE_TYPES)}, received {meta.message_type!r}"
    )


def _put_task_ins(target: Any, task_ins: TaskIns | UnreadableTask) -> None:
    if not isinstance(task_ins, TaskIns):
        raise ConfigError(f"TaskIns: expected a TaskIns, received {type(task_ins).__name__}")
    task = _put_meta(target, task_ins.meta)
    _put_instruction(task.recordset, task_ins.instruction)


def _get_task_ins(source: Any) -> TaskIns | UnreadableTask:
    meta = _get_meta(source, "TaskIns")
    if meta.message_type not in LEGACY_MESSAGE_TYPES:
        return UnreadableTask(meta, _unreadable_type(meta))
    try:
        return TaskIns(meta, _get_instruction(meta.message_type, source.task.recordset))
    except (_Unreadable, ConfigError) as exc:
        return UnreadableTask(meta, str(exc))


def _put_task_res(target: Any, task_res: TaskRes | UnreadableTask) -> None:
    if not isinstance(task_res, TaskRes):
        raise ConfigError(f"TaskRes: expected a TaskRes, received {type(task_res).__name__}")
    task = _put_meta(target, task_res.meta)
    if task_res.error is not None:
        task.error.code = task_res.error.code
        task.error.reason = task_res.error.reason
        return
    assert task_res.reply is not None  # TaskRes holds exactly one of reply and error
    reply = reply_for_flower_peer(task_res.reply)
    assert isinstance(reply, FitRes | EvaluateRes | GetParametersRes | GetPropertiesRes)
    _put_reply(task.recordset, reply)


def _get_task_res(source: Any) -> TaskRes | UnreadableTask:
    meta = _get_meta(source, "TaskRes")
    task = source.task
    if task.HasField("error"):
        return TaskRes(meta, error=FlowerError(code=task.error.code, reason=task.error.reason))
    if meta.message_type not in LEGACY_MESSAGE_TYPES:
        return UnreadableTask(meta, _unreadable_type(meta))
    try:
        return TaskRes(meta, reply=_get_reply(meta.message_type, task.recordset))
    except (_Unreadable, ConfigError) as exc:
        return UnreadableTask(meta, str(exc))


# --- the calls -----------------------------------------------------------------------------


def encode_create_node_request(request: CreateNodeRequest) -> bytes:
    """Serialize a CreateNodeRequest."""
    return pb.CreateNodeRequest(ping_interval=request.ping_interval).SerializeToString()


def decode_create_node_request(data: Data) -> CreateNodeRequest:
    """Parse a CreateNodeRequest."""
    return _parse(pb.CreateNodeRequest(), data, lambda m: CreateNodeRequest(m.ping_interval))


def encode_create_node_response(response: CreateNodeResponse) -> bytes:
    """Serialize a CreateNodeResponse."""
    msg = pb.CreateNodeResponse()
    _put_node(msg.node, response.node)
    return msg.SerializeToString()


def decode_create_node_response(data: Data) -> CreateNodeResponse:
    """Parse a CreateNodeResponse."""
    return _parse(pb.CreateNodeResponse(), data, lambda m: CreateNodeResponse(_get_node(m.node)))


def encode_delete_node_request(request: DeleteNodeRequest) -> bytes:
    """Serialize a DeleteNodeRequest."""
    msg = pb.DeleteNodeRequest()
    _put_node(msg.node, request.node)
    return msg.SerializeToString()


def decode_delete_node_request(data: Data) -> DeleteNodeRequest:
    """Parse a DeleteNodeRequest."""
    return _parse(pb.DeleteNodeRequest(), data, lambda m: DeleteNodeRequest(_get_node(m.node)))


def encode_delete_node_response(response: DeleteNodeResponse) -> bytes:
    """Serialize a DeleteNodeResponse (empty)."""
    return pb.DeleteNodeResponse().SerializeToString()


def decode_delete_node_response(data: Data) -> DeleteNodeResponse:
    """Parse a DeleteNodeResponse."""
    return _parse(pb.DeleteNodeResponse(), data, lambda m: DeleteNodeResponse())


def encode_ping_request(request: PingRequest) -> bytes:
    """Serialize a PingRequest."""
    msg = pb.PingRequest(ping_interval=request.ping_interval)
    _put_node(msg.node, request.node)
    return msg.SerializeToString()


def decode_ping_request(data: Data) -> PingRequest:
    """Parse a PingRequest."""
    return _parse(pb.PingRequest(), data, lambda m: PingRequest(_get_node(m.node), m.ping_interval))


def encode_ping_response(response: PingResponse) -> bytes:
    """Serialize a PingResponse."""
    return pb.PingResponse(success=response.success).SerializeToString()


def decode_ping_response(data: Data) -> PingResponse:
    """Parse a PingResponse."""
    return _parse(pb.PingResponse(), data, lambda m: PingResponse(m.success))


def encode_pull_task_ins_request(request: PullTaskInsRequest) -> bytes:
    """Serialize a PullTaskInsRequest."""
    msg = pb.PullTaskInsRequest(task_ids=list(request.task_ids))
    _put_node(msg.node, request.node)
    return msg.SerializeToString()


def decode_pull_task_ins_request(data: Data) -> PullTaskInsRequest:
    """Parse a PullTaskInsRequest."""
    return _parse(
        pb.PullTaskInsRequest(),
        data,
        lambda m: PullTaskInsRequest(_get_node(m.node), tuple(m.task_ids)),
    )


def _put_reconnect(msg: Any, reconnect: Reconnect | None) -> None:
    if reconnect is not None:
        msg.reconnect.SetInParent()
        msg.reconnect.reconnect = reconnect.reconnect


def _get_reconnect(msg: Any) -> Reconnect | None:
    return Reconnect(msg.reconnect.reconnect) if msg.HasField("reconnect") else None


def encode_pull_task_ins_response(response: PullTaskInsResponse) -> bytes:
    """Serialize a PullTaskInsResponse: each TaskIns's instruction as Flower's RecordSet.

    Raises:
        ConfigError: the list holds an :class:`UnreadableTask` (it has no content to send).
    """
    msg = pb.PullTaskInsResponse()
    _put_reconnect(msg, response.reconnect)
    for task_ins in response.task_ins_list:
        _put_task_ins(msg.task_ins_list.add(), task_ins)
    return msg.SerializeToString()


def decode_pull_task_ins_response(data: Data) -> PullTaskInsResponse:
    """Parse a PullTaskInsResponse; a task Stamen cannot run is an :class:`UnreadableTask`."""
    return _parse(
        pb.PullTaskInsResponse(),
        data,
        lambda m: PullTaskInsResponse(
            task_ins_list=tuple(_get_task_ins(t) for t in m.task_ins_list),
            reconnect=_get_reconnect(m),
        ),
    )


def encode_push_task_res_request(request: PushTaskResRequest) -> bytes:
    """Serialize a PushTaskResRequest: each reply as Flower's RecordSet, its status code
    one Flower knows (:func:`~stamen.protocol.flower_fleet.reply_for_flower_peer`).

    Raises:
        ConfigError: the list holds an :class:`UnreadableTask`.
    """
    msg = pb.PushTaskResRequest()
    _put_node(msg.node, request.node)
    for task_res in request.task_res_list:
        _put_task_res(msg.task_res_list.add(), task_res)
    return msg.SerializeToString()


def decode_push_task_res_request(data: Data) -> PushTaskResRequest:
    """Parse a PushTaskResRequest; a reply Stamen cannot read is an :class:`UnreadableTask`."""
    return _parse(
        pb.PushTaskResRequest(),
        data,
        lambda m: PushTaskResRequest(
            node=_get_node(m.node),
            task_res_list=tuple(_get_task_res(t) for t in m.task_res_list),
        ),
    )


def encode_push_task_res_response(response: PushTaskResResponse) -> bytes:
    """Serialize a PushTaskResResponse."""
    msg = pb.PushTaskResResponse()
    _put_reconnect(msg, response.reconnect)
    for key, value in response.results.items():
        msg.results[key] = value
    return msg.SerializeToString()


def decode_push_task_res_response(data: Data) -> PushTaskResResponse:
    """Parse a PushTaskResResponse."""
    return _parse(
        pb.PushTaskResResponse(),
        data,
        lambda m: PushTaskResResponse(results=dict(m.results), reconnect=_get_reconnect(m)),
    )


def encode_get_run_request(request: GetRunRequest) -> bytes:
    """Serialize a GetRunRequest."""
    msg = pb.GetRunRequest(run_id=request.run_id)
    _put_node(msg.node, request.node)
    return msg.SerializeToString()


def decode_get_run_request(data: Data) -> GetRunRequest:
    """Parse a GetRunRequest."""
    return _parse(pb.GetRunRequest(), data, lambda m: GetRunRequest(_get_node(m.node), m.run_id))


def _put_scalars(target: Any, values: Mapping[str, Scalar]) -> None:
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool = value
        elif isinstance(value, int):
            _put_int(slot, value)
        elif isinstance(value, float):
            slot.double = value
        elif isinstance(value, str):
            slot.string = value
        else:
            slot.bytes = bytes(value)


def _get_scalars(where: str, source: Any) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, scalar in source.items():
        kind = scalar.WhichOneof("scalar")
        if kind is None:
            raise DecodeError(
                f"{where}[{key!r}]: expected one of double/uint64/sint64/bool/string/bytes, "
                "received none"
            )
        out[key] = getattr(scalar, kind)
    return out


def encode_get_run_response(response: GetRunResponse) -> bytes:
    """Serialize a GetRunResponse."""
    msg = pb.GetRunResponse()
    run = response.run
    msg.run.SetInParent()
    msg.run.run_id = run.run_id
    msg.run.fab_id = run.fab_id
    msg.run.fab_version = run.fab_version
    _put_scalars(msg.run.override_config, run.override_config)
    msg.run.fab_hash = run.fab_hash
    return msg.SerializeToString()


def _build_run(m: Any) -> GetRunResponse:
    run = m.run
    return GetRunResponse(
        Run(
            run_id=run.run_id,
            fab_id=run.fab_id,
            fab_version=run.fab_version,
            override_config=_get_scalars("Run.override_config", run.override_config),
            fab_hash=run.fab_hash,
        )
    )


def decode_get_run_response(data: Data) -> GetRunResponse:
    """Parse a GetRunResponse."""
    return _parse(pb.GetRunResponse(), data, _build_run)


def encode_get_fab_request(request: GetFabRequest) -> bytes:
    """Serialize a GetFabRequest."""
    msg = pb.GetFabRequest(hash_str=request.hash_str)
    _put_node(msg.node, request.node)
    return msg.SerializeToString()


def decode_get_fab_request(data: Data) -> GetFabRequest:
    """Parse a GetFabRequest."""
    return _parse(pb.GetFabRequest(), data, lambda m: GetFabRequest(_get_node(m.node), m.hash_str))


def encode_get_fab_response(response: GetFabResponse) -> bytes:
    """Serialize a GetFabResponse."""
    msg = pb.GetFabResponse()
    msg.fab.SetInParent()
    msg.fab.hash_str = response.fab.hash_str
    msg.fab.content = response.fab.content
    return msg.SerializeToString()


def decode_get_fab_response(data: Data) -> GetFabResponse:
    """Parse a GetFabResponse."""
    return _parse(
        pb.GetFabResponse(), data, lambda m: GetFabResponse(Fab(m.fab.hash_str, m.fab.content))
    )


# --- server side: control messages ---------------------------------------------------------


def encode_reconnect_pull_response(task: ReconnectTask) -> bytes:
    """Serialize a PullTaskInsResponse holding one TaskIns of type ``reconnect``: configs
    record ``config`` = ``{"seconds": task.seconds}`` (what Flower 1.12's node reads as a
    ``ReconnectIns``)."""
    msg = pb.PullTaskInsResponse()
    target = msg.task_ins_list.add()
    meta = _put_meta(target, task.meta)
    meta.recordset.SetInParent()
    _put_configs(meta.recordset.configs["config"], {"seconds": task.seconds})
    return msg.SerializeToString()


# --- node authentication ---------------------------------------------------------------------


def deterministic_request(method_name: str, data: Data) -> bytes:
    """``data``, the request of Flower Fleet method ``method_name`` (``"PushTaskRes"``),
    serialized again deterministically (map entries in key order).

    A Flower 1.12 SuperLink with node authentication checks the HMAC of the request it
    parsed, serialized deterministically: a node sends these bytes and signs them.

    Raises:
        ConfigError: ``method_name`` is not a Flower Fleet method.
        DecodeError: ``data`` is not such a request.
    """
    message_class = getattr(pb, f"{method_name}Request", None)
    if message_class is None:
        raise ConfigError(f"method_name: expected a Flower Fleet method, received {method_name!r}")
    return _parse(message_class(), data, lambda m: bytes(m.SerializeToString(deterministic=True)))
