"""The notice of a refused fit result on the wire (``ServerMessage`` field 17): decoded
by Stamen nodes, skipped by Flower's protobuf, sent by the proxy of Stamen nodes only."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stamen.messages import (
    Code,
    EvaluateIns,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Instruction,
    Parameters,
    ReconnectIns,
    Status,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.protocol.mailbox import Mailbox
from stamen.server.client_proxy import RemoteClientProxy
from stamen.server.strategy.validate import collect_refusals, refuse_result
from stamen.wire import (
    RefusedResult,
    decode_instruction,
    decode_server_message,
    encode_instruction,
    encode_instruction_payload,
    with_refused_result,
)
from stamen.wire._pb import stamen_transport_pb2 as pb
from stamen.wire.codec import MAX_REASON_BYTES, REFUSED_RESULT_FIELD

FIT = FitIns(ndarrays_to_parameters([np.arange(6.0).reshape(2, 3)]), {"lr": 0.1})
NOTICE = RefusedResult(3, "array 0 holds 4 NaN and 0 Inf values")


@pytest.mark.parametrize(
    "instruction",
    [
        FIT,
        EvaluateIns(FIT.parameters, {}),
        GetPropertiesIns({"a": 1}),
        ReconnectIns(0),
        ReconnectIns(0, "RunError: no round aggregated"),
    ],
)
def test_the_notice_round_trips_and_leaves_the_instruction_as_it_was(
    instruction: Instruction,
) -> None:
    plain = encode_instruction_payload(instruction)
    data = with_refused_result(plain, NOTICE).tobytes()
    assert data.startswith(plain.tobytes())  # appended: the instruction is not re-encoded
    decoded, refused = decode_server_message(data)
    assert refused == NOTICE
    expected = decode_instruction(plain.tobytes())
    assert decoded == expected
    assert decode_server_message(plain.tobytes()) == (expected, None)


def test_fit_ins_with_a_notice_keeps_the_fast_path_and_its_arrays() -> None:
    data = with_refused_result(encode_instruction_payload(FIT), NOTICE).tobytes()
    decoded = decode_instruction(data)
    assert isinstance(decoded, FitIns)
    assert decoded.config == {"lr": 0.1}
    assert isinstance(decoded.parameters.tensors[0], memoryview)  # not copied out
    np.testing.assert_array_equal(
        parameters_to_ndarrays(decoded.parameters)[0], np.arange(6.0).reshape(2, 3)
    )


def test_flower_protobuf_skips_the_notice() -> None:
    """Flower's ServerMessage (the same field numbers, no field 17) parses the message as
    the plain instruction; the field is kept only as unknown bytes."""
    data = with_refused_result(encode_instruction_payload(FIT), NOTICE).tobytes()
    flower_view = pb.ServerMessage.FromString(data)
    assert flower_view.WhichOneof("msg") == "fit_ins"
    assert dict(flower_view.fit_ins.config)["lr"].double == 0.1
    assert list(flower_view.fit_ins.parameters.tensors) == list(
        pb.ServerMessage.FromString(encode_instruction(FIT)).fit_ins.parameters.tensors
    )
    assert REFUSED_RESULT_FIELD not in {f.number for f in pb.ServerMessage.DESCRIPTOR.fields}


def test_a_long_reason_is_cut_at_a_character_boundary() -> None:
    data = with_refused_result(
        encode_instruction_payload(ReconnectIns(0)), RefusedResult(1, "é" * MAX_REASON_BYTES)
    ).tobytes()
    _, refused = decode_server_message(data)
    assert refused is not None and refused.reason == "é" * (MAX_REASON_BYTES // 2)


def test_a_malformed_notice_is_ignored() -> None:
    plain = encode_instruction(ReconnectIns(0))
    # Field 17 holding a message without its round.
    data = plain + bytes([(REFUSED_RESULT_FIELD << 3 | 2) | 0x80, 0x01, 3, 0x12, 1, 0x41])
    assert decode_server_message(data) == (ReconnectIns(0), None)


def _proxy(*, frames: bool) -> RemoteClientProxy:
    loop = asyncio.new_event_loop()
    loop.close()
    return RemoteClientProxy("7", Mailbox("7"), loop, max_message_length=1 << 20, frames=frames)


def _notice_of(proxy: RemoteClientProxy, instruction: Instruction) -> RefusedResult | None:
    payload = proxy._with_notice(instruction, encode_instruction_payload(instruction))
    return decode_server_message(payload.tobytes())[1]


def test_a_stamen_nodes_proxy_tells_once_then_again_at_the_end_of_the_run() -> None:
    proxy = _proxy(frames=True)
    assert _notice_of(proxy, FIT) is None
    proxy.result_refused(3, NOTICE.reason)
    assert _notice_of(proxy, FIT) == NOTICE
    assert _notice_of(proxy, FIT) is None
    assert _notice_of(proxy, ReconnectIns(None, "RunError: x")) == NOTICE


def test_a_flower_nodes_proxy_never_sends_the_notice() -> None:
    proxy = _proxy(frames=False)
    proxy.result_refused(3, NOTICE.reason)
    assert _notice_of(proxy, FIT) is None
    assert _notice_of(proxy, ReconnectIns(0)) is None


def test_refusals_are_collected_where_the_server_asks() -> None:
    proxy = _proxy(frames=True)
    res = FitRes(Status(Code.OK, ""), Parameters([], ""), 0, {})
    refuse_result(1, proxy, res, "outside")  # nobody collecting: only logged
    with collect_refusals() as refused:
        failure = refuse_result(2, proxy, res, "num_examples=0")
    assert refused == [failure] and failure.reason == "num_examples=0"
