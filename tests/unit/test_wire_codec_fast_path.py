"""The codec's fast path hands unusual bytes to protobuf, and only those.

``_split_parameters`` reads the tensors of FitIns/EvaluateIns/FitRes/GetParametersRes
without protobuf. Bytes it does not take (refused by its own reader, or by protobuf for the
small remainder) go to the protobuf path, which decides; any other error is a bug and
propagates instead of being silenced.
"""

from __future__ import annotations

import numpy as np
import pytest

from stamen.errors import DecodeError
from stamen.messages import Code, FitIns, FitRes, Parameters, Status
from stamen.ndarrays import ndarrays_to_parameters
from stamen.wire import (
    _fast,
    codec,
    decode_instruction,
    decode_reply,
    encode_instruction,
    encode_reply,
)

PARAMS = ndarrays_to_parameters([np.arange(4, dtype=np.float32)])


def _field(number: int, payload: bytes) -> bytes:
    return _fast.length_delimited(number, len(payload)) + payload


def test_truncated_bytes_are_a_decode_error() -> None:
    """Bytes the fast reader refuses (truncated) go to protobuf, which names the error."""
    data = encode_instruction(FitIns(PARAMS, {"lr": 0.1}))
    with pytest.raises(DecodeError, match="invalid ServerMessage"):
        decode_instruction(data[:-1])


def test_a_remainder_protobuf_refuses_is_a_decode_error() -> None:
    """A FitIns whose config entry is not a valid map entry: protobuf refuses it, in the
    fast path (which then steps aside) and in its own."""
    inner = _field(1, b"") + _field(2, b"\xff\xff\xff")
    with pytest.raises(DecodeError, match="invalid ServerMessage"):
        decode_instruction(_field(4, inner))


def test_repeated_parameters_are_decoded_by_protobuf() -> None:
    """Two Parameters fields (protobuf merges them): the fast path steps aside and the
    result is protobuf's."""
    first = _field(1, b"a") + _field(2, b"x")
    second = _field(1, b"b")
    inner = _field(1, first) + _field(1, second)
    ins = decode_instruction(_field(4, inner))
    assert isinstance(ins, FitIns)
    assert [bytes(t) for t in ins.parameters.tensors] == [b"a", b"b"]
    assert ins.parameters.tensor_type == "x"


def test_an_unexpected_error_in_the_fast_path_is_not_silenced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only DecodeError and protobuf's DecodeError send bytes to the protobuf path: a bug
    in the fast reader surfaces instead of being hidden by a slower path."""

    def broken(*args: object) -> Parameters:
        raise RuntimeError("bug in the fast reader")

    monkeypatch.setattr(codec._fast, "read_parameters", broken)
    with pytest.raises(RuntimeError, match="bug in the fast reader"):
        decode_instruction(encode_instruction(FitIns(PARAMS, {})))
    reply = encode_reply(FitRes(Status(Code.OK, ""), PARAMS, 1, {}))
    with pytest.raises(RuntimeError, match="bug in the fast reader"):
        decode_reply(reply)


def test_reply_round_trip_through_both_paths() -> None:
    """FitRes (parameters and metrics) round-trips through the fast path."""
    reply = FitRes(Status(Code.OK, "fine"), PARAMS, 3, {"k": 1})
    assert decode_reply(encode_reply(reply)) == reply
