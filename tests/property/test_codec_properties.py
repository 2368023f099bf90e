"""Properties of the wire codec: exact round-trips, and DecodeError as the only failure."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stamen.errors import DecodeError
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

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# st.text() never yields lone surrogates, so every string is valid UTF-8.
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
    st.sampled_from([INT64_MIN, 2**63 - 1, 2**63, UINT64_MAX, 0, -1]),
    st.floats(),  # NaN and infinities included; compared NaN-aware below
    st.text(max_size=20),
    st.binary(max_size=20),
)
scalar_maps = st.dictionaries(st.text(max_size=10), scalars, max_size=6)

small_arrays = hnp.arrays(
    dtype=st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.boolean_dtypes()),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
parameters = st.one_of(
    st.lists(small_arrays, max_size=3).map(ndarrays_to_parameters),
    st.builds(
        Parameters,
        tensors=st.lists(st.binary(max_size=30), max_size=4),
        tensor_type=st.text(max_size=15),
    ),
)
statuses = st.builds(Status, code=st.sampled_from(list(Code)), message=st.text(max_size=30))
int64s = st.integers(min_value=INT64_MIN, max_value=2**63 - 1)

instructions = st.one_of(
    st.builds(GetPropertiesIns, config=scalar_maps),
    st.builds(GetParametersIns, config=scalar_maps),
    st.builds(FitIns, parameters=parameters, config=scalar_maps),
    st.builds(EvaluateIns, parameters=parameters, config=scalar_maps),
    st.builds(ReconnectIns, seconds=st.integers(min_value=0, max_value=2**63 - 1)),
)
replies = st.one_of(
    st.builds(GetPropertiesRes, status=statuses, properties=scalar_maps),
    st.builds(GetParametersRes, status=statuses, parameters=parameters),
    st.builds(
        FitRes, status=statuses, parameters=parameters, num_examples=int64s, metrics=scalar_maps
    ),
    st.builds(
        EvaluateRes,
        status=statuses,
        loss=st.floats(width=32),  # exactly representable on the 32-bit wire field
        num_examples=int64s,
        metrics=scalar_maps,
    ),
    st.builds(DisconnectRes, reason=st.sampled_from(list(Reason.__members__))),
)


def same(a: Any, b: Any) -> bool:
    """Structural equality where NaN equals NaN and types must match exactly (a decoded
    tensor is a read-only view of the received bytes: it equals the sent bytes by value)."""
    if isinstance(a, memoryview) and isinstance(b, bytes):
        return a.readonly and a.tobytes() == b
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return bool(a == b)


@SETTINGS
@given(instructions)
def test_instruction_round_trip(instruction: Any) -> None:
    """Every valid instruction decodes to an equal one (types, NaN and -0.0 included)."""
    decoded = decode_instruction(encode_instruction(instruction))
    assert same(decoded, instruction), (decoded, instruction)


@SETTINGS
@given(replies)
def test_reply_round_trip(reply: Any) -> None:
    """Every valid reply decodes to an equal one (types, NaN and -0.0 included)."""
    decoded = decode_reply(encode_reply(reply))
    assert same(decoded, reply), (decoded, reply)


@SETTINGS
@given(st.floats(min_value=-3.0e38, max_value=3.0e38))
def test_evaluate_loss_arrives_as_its_float32_rounding(loss: float) -> None:
    """Any float64 loss in float32 range arrives as float(np.float32(loss))."""
    reply = EvaluateRes(status=Status(Code.OK, ""), loss=loss, num_examples=1, metrics={})
    decoded = decode_reply(encode_reply(reply))
    assert isinstance(decoded, EvaluateRes)
    assert decoded.loss == float(np.float32(loss))


def _check_decodes_or_decode_error(decode: Any, encode: Any, data: bytes) -> None:
    try:
        message = decode(data)
    except DecodeError:
        return
    # A message that decodes is a valid one: it re-encodes and decodes to the same.
    assert same(decode(encode(message)), message)


@SETTINGS
@given(st.binary(max_size=300))
def test_decode_instruction_of_arbitrary_bytes(data: bytes) -> None:
    """decode_instruction on any bytes returns a valid instruction or raises DecodeError."""
    _check_decodes_or_decode_error(decode_instruction, encode_instruction, data)


@SETTINGS
@given(st.binary(max_size=300))
def test_decode_reply_of_arbitrary_bytes(data: bytes) -> None:
    """decode_reply on any bytes returns a valid reply or raises DecodeError."""
    _check_decodes_or_decode_error(decode_reply, encode_reply, data)


def _mutate(data: bytes, position: int, byte: int, cut: int) -> bytes:
    if not data:
        return bytes([byte])
    position %= len(data)
    mutated = data[:position] + bytes([byte]) + data[position + 1 :]
    return mutated[: len(mutated) - (cut % (len(mutated) + 1))]


@SETTINGS
@given(
    instructions,
    st.integers(min_value=0),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=8),
)
def test_decode_instruction_of_corrupted_messages(
    instruction: Any, position: int, byte: int, cut: int
) -> None:
    """A valid instruction with one byte changed and its tail cut: valid or DecodeError."""
    data = _mutate(encode_instruction(instruction), position, byte, cut)
    _check_decodes_or_decode_error(decode_instruction, encode_instruction, data)


@SETTINGS
@given(
    replies,
    st.integers(min_value=0),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=8),
)
def test_decode_reply_of_corrupted_messages(reply: Any, position: int, byte: int, cut: int) -> None:
    """A valid reply with one byte changed and its tail cut: valid or DecodeError."""
    data = _mutate(encode_reply(reply), position, byte, cut)
    _check_decodes_or_decode_error(decode_reply, encode_reply, data)
