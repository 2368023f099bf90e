"""The wire codec: Flower's field numbers and types, exact round-trips, DecodeError only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from stamen.errors import ConfigError, DecodeError
from stamen.messages import (
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
    Parameters,
    Reason,
    ReconnectIns,
    Status,
)
from stamen.ndarrays import ndarrays_to_parameters
from stamen.wire import decode_instruction, decode_reply, encode_instruction, encode_reply
from stamen.wire._pb import stamen_transport_pb2 as pb

CONFIG: dict[str, Any] = {
    "int": 3,
    "neg": -(2**63),
    "int64_max": 2**63 - 1,
    "uint64": 2**63,
    "uint64_max": 2**64 - 1,
    "flag": True,
    "off": False,
    "float": 0.1,
    "inf": float("-inf"),
    "text": "héllo",
    "empty": "",
    "blob": b"\x00\xff",
}
PARAMS = ndarrays_to_parameters([np.arange(6, dtype=np.float32).reshape(2, 3), np.array(1.5)])
OK = Status(code=Code.OK, message="Success")

INSTRUCTIONS = [
    GetPropertiesIns(config=CONFIG),
    GetPropertiesIns(config={}),
    GetParametersIns(config=CONFIG),
    GetParametersIns(config={}),
    FitIns(parameters=PARAMS, config=CONFIG),
    FitIns(parameters=Parameters(tensors=[], tensor_type=""), config={}),
    EvaluateIns(parameters=PARAMS, config=CONFIG),
    EvaluateIns(parameters=Parameters(tensors=[b"", b"x"], tensor_type="other"), config={}),
    ReconnectIns(seconds=5),
    ReconnectIns(seconds=2**63 - 1),
]

REPLIES = [
    GetPropertiesRes(status=OK, properties=CONFIG),
    GetPropertiesRes(status=Status(Code.GET_PROPERTIES_NOT_IMPLEMENTED, ""), properties={}),
    GetParametersRes(status=OK, parameters=PARAMS),
    FitRes(status=OK, parameters=PARAMS, num_examples=10, metrics=CONFIG),
    FitRes(
        status=Status(Code.CLIENT_ERROR, "fit raised ValueError: x"),
        parameters=Parameters(tensors=[], tensor_type=""),
        num_examples=0,
        metrics={},
    ),
    FitRes(status=OK, parameters=PARAMS, num_examples=-(2**63), metrics={}),
    EvaluateRes(status=OK, loss=0.5, num_examples=2**63 - 1, metrics=CONFIG),
    EvaluateRes(status=Status(Code.EVALUATE_NOT_IMPLEMENTED, "no"), loss=0.0, num_examples=0),
    *[DisconnectRes(reason=name) for name in Reason.__members__],
]


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=lambda m: type(m).__name__)
def test_instruction_round_trip(instruction: Any) -> None:
    """decode_instruction(encode_instruction(m)) == m for every instruction type."""
    decoded = decode_instruction(encode_instruction(instruction))
    assert decoded == instruction
    assert type(decoded) is type(instruction)


@pytest.mark.parametrize("reply", REPLIES, ids=lambda m: type(m).__name__)
def test_reply_round_trip(reply: Any) -> None:
    """decode_reply(encode_reply(m)) == m for every reply type and every Reason."""
    decoded = decode_reply(encode_reply(reply))
    assert decoded == reply
    assert type(decoded) is type(reply)


def test_scalar_python_types_survive() -> None:
    """bool stays bool, int stays int, float float, bytes bytes, str str."""
    decoded = decode_instruction(encode_instruction(GetPropertiesIns(config=CONFIG)))
    assert isinstance(decoded, GetPropertiesIns)
    for key, value in CONFIG.items():
        assert type(decoded.config[key]) is type(value), key


def test_reconnect_none_travels_as_zero() -> None:
    """ReconnectIns(None) goes on the wire as 0 (proto3 int64), as in Flower."""
    assert decode_instruction(encode_instruction(ReconnectIns(seconds=None))) == ReconnectIns(0)


def _config_kinds(data: bytes) -> dict[str, str | None]:
    msg = pb.ServerMessage()
    msg.ParseFromString(data)
    return {key: s.WhichOneof("scalar") for key, s in msg.get_properties_ins.config.items()}


def test_scalar_encoding_picks_flowers_oneof_fields() -> None:
    """ints <= 2**63-1 go as sint64, larger ones as uint64, bool as bool (never int)."""
    kinds = _config_kinds(encode_instruction(GetPropertiesIns(config=CONFIG)))
    assert kinds == {
        "int": "sint64",
        "neg": "sint64",
        "int64_max": "sint64",
        "uint64": "uint64",
        "uint64_max": "uint64",
        "flag": "bool",
        "off": "bool",
        "float": "double",
        "inf": "double",
        "text": "string",
        "empty": "string",
        "blob": "bytes",
    }


def test_numpy_float64_metric_travels_as_double() -> None:
    """np.float64 (a float subclass) is accepted and arrives as a plain float."""
    reply = GetPropertiesRes(status=OK, properties={"acc": np.float64(0.75)})
    decoded = decode_reply(encode_reply(reply))
    assert isinstance(decoded, GetPropertiesRes)
    assert decoded.properties == {"acc": 0.75}
    assert type(decoded.properties["acc"]) is float


def _numbers(message: Any) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_server_message_field_numbers_match_flower() -> None:
    """ServerMessage: reconnect_ins=1 ... evaluate_ins=5, all in the oneof 'msg', plus
    Stamen's frame=16 (outside Flower's numbers; sent only to Stamen peers)."""
    assert _numbers(pb.ServerMessage) == {
        "reconnect_ins": 1,
        "get_properties_ins": 2,
        "get_parameters_ins": 3,
        "fit_ins": 4,
        "evaluate_ins": 5,
        "frame": 16,
    }
    oneof = pb.ServerMessage.DESCRIPTOR.oneofs_by_name["msg"]
    assert {f.name for f in oneof.fields} == set(_numbers(pb.ServerMessage))


def test_client_message_field_numbers_match_flower() -> None:
    """ClientMessage: disconnect_res=1 ... evaluate_res=5, all in the oneof 'msg', plus
    Stamen's frame=16."""
    assert _numbers(pb.ClientMessage) == {
        "disconnect_res": 1,
        "get_properties_res": 2,
        "get_parameters_res": 3,
        "fit_res": 4,
        "evaluate_res": 5,
        "frame": 16,
    }
    oneof = pb.ClientMessage.DESCRIPTOR.oneofs_by_name["msg"]
    assert {f.name for f in oneof.fields} == set(_numbers(pb.ClientMessage))


T = FieldDescriptor


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (
            pb.Scalar,
            {
                "double": (1, T.TYPE_DOUBLE),
                "uint64": (6, T.TYPE_UINT64),
                "sint64": (8, T.TYPE_SINT64),
                "bool": (13, T.TYPE_BOOL),
                "string": (14, T.TYPE_STRING),
                "bytes": (15, T.TYPE_BYTES),
            },
        ),
        (pb.Parameters, {"tensors": (1, T.TYPE_BYTES), "tensor_type": (2, T.TYPE_STRING)}),
        (pb.Status, {"code": (1, T.TYPE_ENUM), "message": (2, T.TYPE_STRING)}),
        (pb.ReconnectIns, {"seconds": (1, T.TYPE_INT64)}),
        (pb.DisconnectRes, {"reason": (1, T.TYPE_ENUM)}),
        (pb.GetPropertiesIns, {"config": (1, T.TYPE_MESSAGE)}),
        (pb.GetParametersIns, {"config": (1, T.TYPE_MESSAGE)}),
        (pb.FitIns, {"parameters": (1, T.TYPE_MESSAGE), "config": (2, T.TYPE_MESSAGE)}),
        (pb.EvaluateIns, {"parameters": (1, T.TYPE_MESSAGE), "config": (2, T.TYPE_MESSAGE)}),
        (pb.GetPropertiesRes, {"status": (1, T.TYPE_MESSAGE), "properties": (2, T.TYPE_MESSAGE)}),
        (pb.GetParametersRes, {"status": (1, T.TYPE_MESSAGE), "parameters": (2, T.TYPE_MESSAGE)}),
        (
            pb.FitRes,
            {
                "status": (1, T.TYPE_MESSAGE),
                "parameters": (2, T.TYPE_MESSAGE),
                "num_examples": (3, T.TYPE_INT64),
                "metrics": (4, T.TYPE_MESSAGE),
            },
        ),
        (
            pb.EvaluateRes,
            {
                "status": (1, T.TYPE_MESSAGE),
                "loss": (2, T.TYPE_FLOAT),
                "num_examples": (3, T.TYPE_INT64),
                "metrics": (4, T.TYPE_MESSAGE),
            },
        ),
    ],
    ids=lambda v: v.DESCRIPTOR.name if hasattr(v, "DESCRIPTOR") else "",
)
def test_field_numbers_and_types_match_flower(message: Any, fields: dict[str, Any]) -> None:
    """Each shared message has exactly Flower's field numbers and wire types."""
    actual = {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}
    assert actual == fields


def test_scalar_fields_form_one_oneof() -> None:
    """Scalar's six fields are members of the oneof 'scalar'."""
    oneof = pb.Scalar.DESCRIPTOR.oneofs_by_name["scalar"]
    assert {f.name for f in oneof.fields} == {
        "double",
        "uint64",
        "sint64",
        "bool",
        "string",
        "bytes",
    }


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.GetPropertiesIns, "config"),
        (pb.GetParametersIns, "config"),
        (pb.FitIns, "config"),
        (pb.EvaluateIns, "config"),
        (pb.GetPropertiesRes, "properties"),
        (pb.FitRes, "metrics"),
        (pb.EvaluateRes, "metrics"),
    ],
)
def test_scalar_maps_are_string_to_scalar(message: Any, field: str) -> None:
    """Config, properties and metrics are map<string, Scalar>."""
    entry = message.DESCRIPTOR.fields_by_name[field].message_type
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == T.TYPE_STRING
    assert entry.fields_by_name["value"].message_type.name == "Scalar"


def test_enum_numbers_match_flower() -> None:
    """The wire enums Code and Reason carry Flower's numbers."""
    assert {v.name: v.number for v in pb.Reason.DESCRIPTOR.values} == {
        "UNKNOWN": 0,
        "RECONNECT": 1,
        "POWER_DISCONNECTED": 2,
        "WIFI_UNAVAILABLE": 3,
        "ACK": 4,
    }
    codes = {v.name: v.number for v in pb.Code.DESCRIPTOR.values}
    assert codes == {c.name: int(c) for c in Code}
    assert codes["FIT_NOT_IMPLEMENTED"] == 3


@pytest.mark.parametrize("loss", [0.1, 0.2095516324043274, 1 / 3, 123456.789, -2.5e-7, 3.0e38, 0.0])
def test_evaluate_res_loss_is_rounded_to_float32(loss: float) -> None:
    """EvaluateRes.loss is a 32-bit float on the wire: it comes back as float32(loss)."""
    reply = EvaluateRes(status=OK, loss=loss, num_examples=1, metrics={})
    decoded = decode_reply(encode_reply(reply))
    assert isinstance(decoded, EvaluateRes)
    assert decoded.loss == float(np.float32(loss))
    assert type(decoded.loss) is float


@pytest.mark.parametrize(("reason", "number"), [("ACK", 4), ("RECONNECT", 1), ("UNKNOWN", 0)])
def test_disconnect_reason_numbers(reason: str, number: int) -> None:
    """DisconnectRes reasons travel as Flower's numbers (ACK=4, RECONNECT=1)."""
    msg = pb.ClientMessage()
    msg.ParseFromString(encode_reply(DisconnectRes(reason=reason)))
    assert msg.WhichOneof("msg") == "disconnect_res"
    assert msg.disconnect_res.reason == number


def test_decodes_bytes_built_by_field_number() -> None:
    """A reply built only from field numbers (as a Flower peer does) decodes correctly."""
    msg = pb.ClientMessage()
    msg.fit_res.status.code = 0
    msg.fit_res.status.message = "Success"
    msg.fit_res.parameters.tensor_type = "numpy.ndarray"
    msg.fit_res.num_examples = 42
    msg.fit_res.metrics["acc"].double = 0.5
    decoded = decode_reply(msg.SerializeToString())
    assert decoded == FitRes(
        status=OK,
        parameters=Parameters(tensors=[], tensor_type="numpy.ndarray"),
        num_examples=42,
        metrics={"acc": 0.5},
    )


def test_unknown_reason_number_is_a_decode_error() -> None:
    """A DisconnectRes reason outside Reason (e.g. 9) raises DecodeError naming it."""
    msg = pb.ClientMessage()
    msg.disconnect_res.reason = 9  # type: ignore[assignment]
    with pytest.raises(DecodeError, match="9"):
        decode_reply(msg.SerializeToString())


@pytest.mark.parametrize("kind", ["fit_res", "evaluate_res", "get_parameters_res"])
def test_unknown_status_code_is_a_decode_error(kind: str) -> None:
    """A Status code outside Code (e.g. 9) raises DecodeError naming the field and value."""
    msg = pb.ClientMessage()
    getattr(msg, kind).status.code = 9
    with pytest.raises(DecodeError) as info:
        decode_reply(msg.SerializeToString())
    assert "Status.code" in str(info.value)
    assert "9" in str(info.value)


def test_scalar_without_value_is_a_decode_error() -> None:
    """A config entry whose Scalar has no field set raises DecodeError naming the key."""
    msg = pb.ServerMessage()
    msg.get_properties_ins.config["lonely"].SetInParent()
    with pytest.raises(DecodeError, match="lonely"):
        decode_instruction(msg.SerializeToString())


def test_negative_reconnect_seconds_on_the_wire_is_a_decode_error() -> None:
    """A ReconnectIns with negative seconds is invalid; decoding says DecodeError."""
    msg = pb.ServerMessage()
    msg.reconnect_ins.seconds = -1
    with pytest.raises(DecodeError):
        decode_instruction(msg.SerializeToString())


@pytest.mark.parametrize("decode", [decode_instruction, decode_reply])
@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", b"\x0a\x05abc", b"\x08\x01", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"],
    ids=["empty", "bad tag", "truncated", "unknown field only", "overlong varint"],
)
def test_empty_or_garbage_is_a_decode_error(decode: Any, data: bytes) -> None:
    """An empty message (no oneof set) or garbage raises DecodeError, nothing else."""
    with pytest.raises(DecodeError):
        decode(data)


def test_invalid_utf8_string_is_a_decode_error() -> None:
    """A string field holding invalid UTF-8 raises DecodeError."""
    good = encode_reply(GetPropertiesRes(status=Status(Code.OK, "AB"), properties={}))
    bad = good.replace(b"AB", b"\xc3\x28")
    assert bad != good
    with pytest.raises(DecodeError):
        decode_reply(bad)


@pytest.mark.parametrize("reply", REPLIES[:3], ids=lambda m: type(m).__name__)
def test_encode_instruction_refuses_a_reply(reply: Any) -> None:
    """encode_instruction of a reply raises ConfigError naming the received type."""
    with pytest.raises(ConfigError, match=type(reply).__name__):
        encode_instruction(reply)


@pytest.mark.parametrize("instruction", INSTRUCTIONS[:3], ids=lambda m: type(m).__name__)
def test_encode_reply_refuses_an_instruction(instruction: Any) -> None:
    """encode_reply of an instruction raises ConfigError naming the received type."""
    with pytest.raises(ConfigError, match=type(instruction).__name__):
        encode_reply(instruction)


def test_encoding_is_deterministic_for_equal_messages() -> None:
    """Equal messages encode to the same length and decode to equal messages."""
    a = encode_instruction(FitIns(parameters=PARAMS, config={"a": 1, "b": 2}))
    b = encode_instruction(FitIns(parameters=PARAMS, config={"a": 1, "b": 2}))
    assert len(a) == len(b)
    assert decode_instruction(a) == decode_instruction(b)
