"""Encode and decode messages (dataclasses <-> protobuf bytes).

This is the only module that touches generated protobuf classes. Decoders raise only
:class:`~stamen.errors.DecodeError`, whatever bytes they are given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError

from ..errors import ConfigError, DecodeError
from ..messages import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Parameters,
    Reason,
    ReconnectIns,
    Reply,
    Status,
)
from ..typing import Scalar
from . import _fast
from ._pb import stamen_transport_pb2 as pb
from .frames import Payload, TensorPart

__all__ = [
    "DEFAULT_REPLY_LIMITS",
    "REFUSED_RESULT_FIELD",
    "RefusedResult",
    "ReplyLimits",
    "check_reply",
    "decode_instruction",
    "decode_reply",
    "decode_server_message",
    "encode_instruction",
    "encode_instruction_payload",
    "encode_reply",
    "encode_reply_payload",
    "with_refused_result",
]

Data = bytes | memoryview

_INT64_MAX = 2**63 - 1


# --- scalars -----------------------------------------------------------------------------


def _put_scalars(target: Any, values: Mapping[str, Scalar]) -> None:
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool = value
        elif isinstance(value, int):
            if value > _INT64_MAX:
                slot.uint64 = value
            else:
                slot.sint64 = value
        elif isinstance(value, float):
            slot.double = value
        elif isinstance(value, str):
            slot.string = value
        else:
            slot.bytes = value


def _get_scalars(source: Any) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, scalar in source.items():
        kind = scalar.WhichOneof("scalar")
        if kind is None:
            raise DecodeError(
                f"scalar {key!r}: expected one of double/uint64/sint64/bool/string/bytes, "
                "received none"
            )
        out[key] = getattr(scalar, kind)
    return out


def _get_parameters(source: Any) -> Parameters:
    return Parameters(tensors=list(source.tensors), tensor_type=source.tensor_type)


def _put_status(target: Any, status: Status) -> None:
    target.code = int(status.code)
    target.message = status.message


def _get_status(source: Any) -> Status:
    try:
        code = Code(source.code)
    except ValueError as exc:
        raise DecodeError(
            f"Status.code: expected one of {[int(c) for c in Code]}, received {source.code}"
        ) from exc
    return Status(code=code, message=source.message)


# --- server -> client --------------------------------------------------------------------


def _with_parameters(
    outer: int, small: bytes, field: int, parameters: Parameters, *, by_reference: bool = False
) -> Payload:
    """``outer`` field holding a message made of ``small`` plus ``parameters`` at ``field``,
    the tensors not copied; ``by_reference``: each read from ``parameters`` when the
    payload is (:class:`~stamen.wire.frames.TensorPart`)."""
    chunks, size = _fast.parameters_chunks(parameters, TensorPart if by_reference else None)
    head = _fast.length_delimited(field, size)
    inner = len(small) + len(head) + size
    return Payload([_fast.length_delimited(outer, inner), small, head, *chunks])


def encode_instruction(instruction: Instruction) -> bytes:
    """Serialize an instruction as ``ServerMessage`` bytes."""
    return encode_instruction_payload(instruction).tobytes()


def encode_reply(reply: Reply) -> bytes:
    """Serialize a reply as ``ClientMessage`` bytes."""
    return encode_reply_payload(reply).tobytes()


def encode_instruction_payload(instruction: Instruction) -> Payload:
    """Serialize an instruction as a ``ServerMessage``, its tensors not copied."""
    if isinstance(instruction, FitIns | EvaluateIns):
        small: Any = pb.FitIns() if isinstance(instruction, FitIns) else pb.EvaluateIns()
        _put_scalars(small.config, instruction.config)
        outer = 4 if isinstance(instruction, FitIns) else 5
        # By reference: a global model parked on disk once its nodes have it is sent from
        # there to a pull-based node that asks for a frame again.
        return _with_parameters(
            outer, small.SerializeToString(), 1, instruction.parameters, by_reference=True
        )
    msg = pb.ServerMessage()
    if isinstance(instruction, GetParametersIns):
        msg.get_parameters_ins.SetInParent()
        _put_scalars(msg.get_parameters_ins.config, instruction.config)
    elif isinstance(instruction, GetPropertiesIns):
        msg.get_properties_ins.SetInParent()
        _put_scalars(msg.get_properties_ins.config, instruction.config)
    elif isinstance(instruction, ReconnectIns):
        if instruction.reason is not None:
            return _reconnect_with_reason(instruction.seconds or 0, instruction.reason)
        msg.reconnect_ins.seconds = instruction.seconds or 0
    else:
        raise ConfigError(f"expected an instruction message, received {type(instruction).__name__}")
    return Payload.of(msg.SerializeToString())


RECONNECT_REASON_FIELD = 15
"""Field of ``ReconnectIns`` that carries :attr:`ReconnectIns.reason` (Stamen): a string,
outside Flower's numbers, which Flower's protobuf skips as an unknown field."""

MAX_REASON_BYTES = 8192
"""A reason longer than this (UTF-8) is cut when sent, and when received."""


def _cut(reason: bytes) -> bytes:
    """``reason`` cut to :data:`MAX_REASON_BYTES` at a character boundary."""
    if len(reason) <= MAX_REASON_BYTES:
        return reason
    return reason[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _reconnect_with_reason(seconds: int, reason: str) -> Payload:
    """``ServerMessage{reconnect_ins: {seconds, 15: reason}}``: field 15 written by hand
    (the generated class has no such field, so Flower's does not either)."""
    text = _cut(reason.encode("utf-8"))
    inner = (
        pb.ReconnectIns(seconds=seconds).SerializeToString()
        + _fast.length_delimited(RECONNECT_REASON_FIELD, len(text))
        + text
    )
    return Payload.of(_fast.length_delimited(1, len(inner)) + inner)


def _reconnect_reason(ins: Any) -> str | None:
    """The reason field of a parsed ``ReconnectIns`` (kept by protobuf as an unknown
    field), or None."""
    data = memoryview(ins.SerializeToString())
    for number, wire, _, start, end in _fast.split_fields(data, 0, len(data)):
        if number == RECONNECT_REASON_FIELD and wire == 2:
            return _cut(bytes(data[start:end])).decode("utf-8", "replace")
    return None


REFUSED_RESULT_FIELD = 17
"""Top-level field of ``ServerMessage`` (Stamen) that tells a node the server refused its
last fit result: ``RefusedResult { uint64 server_round = 1; string reason = 2; }``,
appended after the instruction. Flower's protobuf skips it as an unknown field."""


@dataclass(frozen=True)
class RefusedResult:
    """What a Stamen server tells a node whose fit result it refused (field
    :data:`REFUSED_RESULT_FIELD` of ``ServerMessage``).

    Attributes:
        server_round: The round of the refused result.
        reason: Why the strategy refused it (UTF-8, at most :data:`MAX_REASON_BYTES`).
    """

    server_round: int
    reason: str


def with_refused_result(payload: Payload, refused: RefusedResult) -> Payload:
    """``payload`` (an encoded ``ServerMessage``) followed by the notice ``refused`` as
    field :data:`REFUSED_RESULT_FIELD`; the instruction's buffers are not copied."""
    text = _cut(refused.reason.encode("utf-8"))
    inner = (
        _fast.varint(1 << 3)
        + _fast.varint(max(refused.server_round, 0))
        + _fast.length_delimited(2, len(text))
        + text
    )
    return payload.followed_by(_fast.length_delimited(REFUSED_RESULT_FIELD, len(inner)) + inner)


def _refused_result(view: memoryview, start: int, end: int) -> RefusedResult | None:
    """The notice in ``view[start:end]`` (a RefusedResult message); None if malformed."""
    server_round: int | None = None
    reason: str | None = None
    for number, wire, _, value_start, value_end in _fast.split_fields(view, start, end):
        if number == 1 and wire == 0:
            server_round, _ = _fast.read_varint(view, value_start, value_end)
        elif number == 2 and wire == 2:
            reason = _cut(bytes(view[value_start:value_end])).decode("utf-8", "replace")
    if server_round is None or reason is None:
        return None
    return RefusedResult(server_round, reason)


def _take_refused_result(view: memoryview) -> tuple[memoryview, RefusedResult | None]:
    """``view`` without a trailing :data:`REFUSED_RESULT_FIELD`, and the notice it held.

    Only a notice after the instruction (where a Stamen server puts it) is taken; the
    bytes are otherwise left to the decoder, which skips unknown fields.
    """
    try:
        fields = list(_fast.split_fields(view, 0, len(view)))
    except DecodeError:
        return view, None
    if len(fields) < 2:
        return view, None
    number, wire, tag_start, start, end = fields[-1]
    if number != REFUSED_RESULT_FIELD or wire != 2 or end != len(view):
        return view, None
    try:
        refused = _refused_result(view, start, end)
    except DecodeError:
        refused = None
    return view[:tag_start], refused


def _split_parameters(
    data: Data, carriers: dict[int, Any], field: int
) -> tuple[int, Parameters, Any] | None:
    """Fast path: ``data`` is one top-level field in ``carriers`` holding one Parameters at
    ``field``. Returns (top-level field, Parameters, the carrier parsed without it)."""
    view = memoryview(data)
    try:
        top = list(_fast.split_fields(view, 0, len(view)))
        if len(top) != 1 or top[0][0] not in carriers or top[0][1] != 2:
            return None
        outer, _, _, start, end = top[0]
        rest: list[memoryview] = []
        parameters = None
        for number, wire, tag_start, value_start, value_end in _fast.split_fields(view, start, end):
            if number == field:
                if wire != 2 or parameters is not None:
                    return None
                parameters = _fast.read_parameters(view, value_start, value_end)
                if parameters is None:
                    return None
            else:
                rest.append(view[tag_start:value_end])
        carrier = carriers[outer]()
        carrier.ParseFromString(b"".join(rest))
    except (DecodeError, ProtobufDecodeError):
        # Bytes the fast path does not take (a group, a truncated field, a field
        # protobuf refuses): the protobuf path decides, and names the error.
        return None
    if parameters is None:
        parameters = Parameters(tensors=[], tensor_type="")
    return outer, parameters, carrier


def decode_instruction(data: Data) -> Instruction:
    """Parse ``ServerMessage`` bytes (a Stamen notice in them is skipped, as Flower's
    protobuf skips it).

    Raises:
        DecodeError: the bytes are not a valid ServerMessage with one instruction set.
    """
    return decode_server_message(data)[0]


def decode_server_message(data: Data) -> tuple[Instruction, RefusedResult | None]:
    """Parse ``ServerMessage`` bytes: the instruction, and the notice that the server
    refused this node's last fit result (field :data:`REFUSED_RESULT_FIELD`), or None.

    Raises:
        DecodeError: the bytes are not a valid ServerMessage with one instruction set.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    view, refused = _take_refused_result(view)
    return _decode_instruction(view), refused


def _decode_instruction(data: memoryview) -> Instruction:
    fast = _split_parameters(data, {4: pb.FitIns, 5: pb.EvaluateIns}, 1)
    if fast is not None:
        outer, parameters, carrier = fast
        try:
            config = _get_scalars(carrier.config)
            if outer == 4:
                return FitIns(parameters, config)
            return EvaluateIns(parameters, config)
        except ConfigError as exc:  # our validators refuse a decoded value
            raise DecodeError(f"invalid ServerMessage ({len(data)} bytes): {exc}") from exc
    msg = pb.ServerMessage()
    try:
        msg.ParseFromString(bytes(data))
        kind = msg.WhichOneof("msg")
        if kind == "fit_ins":
            return FitIns(_get_parameters(msg.fit_ins.parameters), _get_scalars(msg.fit_ins.config))
        if kind == "evaluate_ins":
            ins = msg.evaluate_ins
            return EvaluateIns(_get_parameters(ins.parameters), _get_scalars(ins.config))
        if kind == "get_parameters_ins":
            return GetParametersIns(_get_scalars(msg.get_parameters_ins.config))
        if kind == "get_properties_ins":
            return GetPropertiesIns(_get_scalars(msg.get_properties_ins.config))
        if kind == "reconnect_ins":
            return ReconnectIns(
                seconds=msg.reconnect_ins.seconds, reason=_reconnect_reason(msg.reconnect_ins)
            )
    except (ProtobufDecodeError, ConfigError) as exc:  # protobuf's, or our validators'
        raise DecodeError(f"invalid ServerMessage ({len(data)} bytes): {exc}") from exc
    raise DecodeError(
        f"ServerMessage ({len(data)} bytes): expected one instruction set, received none"
    )


# --- client -> server --------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyLimits:
    """What one reply may hold, checked by :func:`check_reply` before anything is built.

    Attributes:
        max_tensors: Tensors in its Parameters (the server: the model's tensor count, with
            slack, when it knows the model; else :data:`DEFAULT_REPLY_LIMITS`).
        max_metrics: Entries of its metrics (or properties) map.
    """

    max_tensors: int = 100_000
    max_metrics: int = 10_000


DEFAULT_REPLY_LIMITS = ReplyLimits()
"""Limits of a reply to an instruction whose model layout is unknown (GetParametersIns, or
a FitIns with empty parameters)."""

_REPLY_FIELDS = 8
"""Top-level fields a ClientMessage may have (one reply; a few repeats, which protobuf
merges, are tolerated)."""
_OTHER_FIELDS = 16
"""Fields of a reply besides its metrics entries, and of Parameters besides its tensors."""
_PARAMETERS_FIELD = {3: 2, 4: 2}
"""ClientMessage field -> the field of its Parameters (GetParametersRes, FitRes)."""
_METRICS_FIELD = {2: 2, 4: 4, 5: 4}
"""ClientMessage field -> the field of its metrics map (GetPropertiesRes, FitRes,
EvaluateRes)."""


_Fields = list[tuple[int, int, int, int, int]]
_TOO_MANY: _Fields = []
"""What :func:`_bounded_fields` returns for more fields than its limit (compared by
identity)."""


def _bounded_fields(view: memoryview, start: int, end: int, limit: int) -> _Fields | None:
    """The fields of ``view[start:end]``; None if they do not parse (the decoder will say
    how); :data:`_TOO_MANY` if there are more than ``limit`` (the walk stops there)."""
    fields: _Fields = []
    try:
        for found in _fast.split_fields(view, start, end):
            fields.append(found)
            if len(fields) > limit:
                return _TOO_MANY
    except DecodeError:
        return None
    return fields


def check_reply(data: Data, limits: ReplyLimits = DEFAULT_REPLY_LIMITS) -> None:
    """Check ``ClientMessage`` bytes against ``limits`` by walking their field headers:
    what it costs is bounded by the limits, not by what the bytes claim, and nothing is
    allocated per tensor or metric. Bytes it cannot walk are left to the decoder.

    Raises:
        DecodeError: more tensors, metrics or fields than allowed.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    top = _bounded_fields(view, 0, len(view), _REPLY_FIELDS)
    if top is _TOO_MANY:
        raise DecodeError(f"ClientMessage: more than {_REPLY_FIELDS} top-level fields")
    tensors = metrics = 0
    for number, wire, _, start, end in top or ():
        if wire != 2 or (number not in _METRICS_FIELD and number not in _PARAMETERS_FIELD):
            continue
        inner = _bounded_fields(view, start, end, limits.max_metrics + _OTHER_FIELDS)
        if inner is _TOO_MANY:
            metrics = limits.max_metrics + 1
        for field, field_wire, _, value_start, value_end in inner or ():
            if field == _METRICS_FIELD.get(number):
                metrics += 1
            elif field == _PARAMETERS_FIELD.get(number) and field_wire == 2:
                budget = max(0, limits.max_tensors - tensors) + _OTHER_FIELDS
                found = _bounded_fields(view, value_start, value_end, budget)
                if found is _TOO_MANY:
                    tensors = limits.max_tensors + 1
                else:
                    tensors += sum(1 for f in found or () if f[0] == 1)
            if tensors > limits.max_tensors:
                raise DecodeError(
                    f"ClientMessage: more than {limits.max_tensors} tensors, the most a "
                    "reply to this instruction may have"
                )
        if metrics > limits.max_metrics:
            raise DecodeError(
                f"ClientMessage: more than {limits.max_metrics} metrics, the most a reply may have"
            )


def encode_reply_payload(reply: Reply) -> Payload:
    """Serialize a reply as a ``ClientMessage``, its tensors not copied."""
    if isinstance(reply, FitRes):
        fit = pb.FitRes(num_examples=reply.num_examples)
        _put_status(fit.status, reply.status)
        _put_scalars(fit.metrics, reply.metrics)
        return _with_parameters(4, fit.SerializeToString(), 2, reply.parameters)
    if isinstance(reply, GetParametersRes):
        res = pb.GetParametersRes()
        _put_status(res.status, reply.status)
        return _with_parameters(3, res.SerializeToString(), 2, reply.parameters)
    msg = pb.ClientMessage()
    if isinstance(reply, EvaluateRes):
        ev = msg.evaluate_res
        _put_status(ev.status, reply.status)
        ev.loss = reply.loss
        ev.num_examples = reply.num_examples
        _put_scalars(ev.metrics, reply.metrics)
    elif isinstance(reply, GetPropertiesRes):
        pr = msg.get_properties_res
        _put_status(pr.status, reply.status)
        _put_scalars(pr.properties, reply.properties)
    elif isinstance(reply, DisconnectRes):
        msg.disconnect_res.reason = pb.Reason.Value(reply.reason)
    else:
        raise ConfigError(f"expected a reply message, received {type(reply).__name__}")
    return Payload.of(msg.SerializeToString())


def decode_reply(data: Data, limits: ReplyLimits | None = None) -> Reply:
    """Parse ``ClientMessage`` bytes; with ``limits``, check them first
    (:func:`check_reply`).

    Raises:
        DecodeError: the bytes are not a valid ClientMessage with one reply set, or hold
            more than ``limits`` allow.
    """
    if limits is not None:
        check_reply(data, limits)
    fast = _split_parameters(data, {4: pb.FitRes, 3: pb.GetParametersRes}, 2)
    if fast is not None:
        outer, parameters, carrier = fast
        try:
            status = _get_status(carrier.status)
            if outer == 4:
                return FitRes(
                    status, parameters, carrier.num_examples, _get_scalars(carrier.metrics)
                )
            return GetParametersRes(status, parameters)
        except ConfigError as exc:  # our validators refuse a decoded value
            raise DecodeError(f"invalid ClientMessage ({len(data)} bytes): {exc}") from exc
    msg = pb.ClientMessage()
    try:
        msg.ParseFromString(bytes(data))
        kind = msg.WhichOneof("msg")
        if kind == "fit_res":
            fr = msg.fit_res
            return FitRes(
                _get_status(fr.status),
                _get_parameters(fr.parameters),
                fr.num_examples,
                _get_scalars(fr.metrics),
            )
        if kind == "evaluate_res":
            er = msg.evaluate_res
            return EvaluateRes(
                _get_status(er.status), er.loss, er.num_examples, _get_scalars(er.metrics)
            )
        if kind == "get_parameters_res":
            gp = msg.get_parameters_res
            return GetParametersRes(_get_status(gp.status), _get_parameters(gp.parameters))
        if kind == "get_properties_res":
            pr = msg.get_properties_res
            return GetPropertiesRes(_get_status(pr.status), _get_scalars(pr.properties))
        if kind == "disconnect_res":
            reason = msg.disconnect_res.reason
            try:
                return DisconnectRes(reason=Reason(reason).name)
            except ValueError as exc:
                raise DecodeError(
                    f"DisconnectRes.reason: expected one of {[int(r) for r in Reason]}, "
                    f"received {reason}"
                ) from exc
    except (ProtobufDecodeError, ConfigError) as exc:  # protobuf's, or our validators'
        raise DecodeError(f"invalid ClientMessage ({len(data)} bytes): {exc}") from exc
    raise DecodeError(f"ClientMessage ({len(data)} bytes): expected one reply set, received none")
