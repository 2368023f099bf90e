"""Properties of the Fleet codec (grpc-rere/rest): round-trips, DecodeError only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamen.errors import DecodeError
from stamen.protocol.fleet import (
    CreateNodeRequest,
    CreateNodeResponse,
    PullRequest,
    PullResponse,
    PushRequest,
    SimpleRequest,
)
from stamen.wire import fleet_codec as fc
from stamen.wire._pb import stamen_fleet_pb2 as pb
from stamen.wire.frames import Payload

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

versions = st.integers(min_value=0, max_value=2**32 - 1)  # uint32
node_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # sint64
task_ids = st.integers(min_value=0, max_value=2**64 - 1)  # uint64
seconds = st.floats(allow_nan=False)

CASES: list[tuple[Any, Callable[[Any], bytes], Callable[[bytes], Any]]] = [
    (
        st.builds(CreateNodeRequest, protocol_version=versions),
        fc.encode_create_node_request,
        fc.decode_create_node_request,
    ),
    (
        st.builds(
            CreateNodeResponse, node_id=node_ids, heartbeat_interval=seconds, poll_timeout=seconds
        ),
        fc.encode_create_node_response,
        fc.decode_create_node_response,
    ),
    (
        st.builds(SimpleRequest, node_id=node_ids, protocol_version=versions),
        fc.encode_simple_request,
        fc.decode_simple_request,
    ),
    (
        st.builds(PullRequest, node_id=node_ids, protocol_version=versions),
        fc.encode_pull_request,
        fc.decode_pull_request,
    ),
    (
        st.builds(PullResponse, task_id=task_ids, server_message=st.binary(max_size=64)),
        fc.encode_pull_response,
        fc.decode_pull_response,
    ),
    (
        st.builds(
            PushRequest,
            node_id=node_ids,
            task_id=task_ids,
            client_message=st.binary(max_size=64),
            protocol_version=versions,
        ),
        fc.encode_push_request,
        fc.decode_push_request,
    ),
]

cases = st.sampled_from(CASES)


@SETTINGS
@given(st.data())
def test_fleet_messages_round_trip(data: st.DataObject) -> None:
    """Every Fleet message decodes to an equal one."""
    strategy, encode, decode = data.draw(cases)
    message = data.draw(strategy)
    assert decode(encode(message)) == message


@SETTINGS
@given(cases, st.binary(max_size=200))
def test_fleet_decoders_raise_only_decode_error(case: Any, raw: bytes) -> None:
    """Every Fleet decoder returns a message or raises DecodeError, for any bytes."""
    _, encode, decode = case
    try:
        message = decode(raw)
    except DecodeError:
        return
    assert decode(encode(message)) == message


@SETTINGS
@given(task_ids, st.binary(max_size=64))
def test_pull_response_is_encoded_as_protobuf_does(task_id: int, message: bytes) -> None:
    """The hand-written PullInstructionResponse is byte for byte protobuf's."""
    expected = pb.PullInstructionResponse(task_id=task_id, server_message=message)
    assert fc.encode_pull_response(PullResponse(task_id, message)) == (expected.SerializeToString())


@SETTINGS
@given(
    task_ids,
    st.lists(st.binary(max_size=40), min_size=1, max_size=4),
    st.integers(0, 200),
    st.integers(1, 64),
)
def test_a_frame_given_as_views_is_encoded_as_protobuf_does(
    task_id: int, parts: list[bytes], offset: int, size: int
) -> None:
    """A frame of a large instruction goes into its PullInstructionResponse as views of
    the payload (joined once): byte for byte protobuf's encoding of the frame's bytes."""
    payload = Payload([memoryview(p) for p in parts])
    if not len(payload):
        return
    offset %= len(payload)
    expected = pb.PullInstructionResponse(
        task_id=task_id, server_message=payload.frame(offset, size)
    ).SerializeToString()
    encoded = fc.encode_pull_response(PullResponse(task_id, payload.frame_payload(offset, size)))
    assert encoded == expected


@SETTINGS
@given(node_ids, task_ids, st.binary(max_size=64), versions)
def test_push_request_is_encoded_as_protobuf_does(
    node_id: int, task_id: int, message: bytes, version: int
) -> None:
    """The hand-written PushReplyRequest is byte for byte protobuf's (its header present
    even when empty, as protobuf writes a set submessage)."""
    expected = pb.PushReplyRequest(task_id=task_id, client_message=message)
    expected.header.protocol_version = version
    expected.header.node_id = node_id
    encoded = fc.encode_push_request(PushRequest(node_id, task_id, message, version))
    assert encoded == expected.SerializeToString()
    assert fc.scan_push_request(encoded) is not None  # read in place, not by protobuf


_EXTRA_FIELDS = st.lists(
    st.sampled_from(
        [
            b"\x08\x07",  # field 1 as a varint (PullInstructionResponse: a repeated task_id)
            b"\x10\x05",  # field 2 as a varint (PushReplyRequest: a repeated task_id)
            b"\x12\x02ab",  # field 2, length-delimited
            b"\x1a\x01c",  # field 3, length-delimited
            b"\x0a\x02\x08\x02",  # field 1, length-delimited (a header: protocol_version 2)
            b"\x0a\x02\x10\x03",  # field 1, length-delimited (a header: node_id -2)
            b"\xa0\x06\x01",  # field 100, varint: unknown
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an over-long varint
        ]
    ),
    max_size=5,
)


@SETTINGS
@given(_EXTRA_FIELDS, _EXTRA_FIELDS)
def test_model_carrying_messages_decode_as_protobuf_does(
    before: list[bytes], after: list[bytes]
) -> None:
    """Whatever layout protobuf reads (fields repeated, unknown, out of order), the
    hand-written decoders read the same message from it, or refuse it as protobuf does."""
    pull = b"".join(before) + fc.encode_pull_response(PullResponse(9, b"model")) + b"".join(after)
    push = b"".join(before) + fc.encode_push_request(PushRequest(-4, 9, b"reply", 2))
    push += b"".join(after)
    for data, decode, message, build in (
        (pull, fc.decode_pull_response, pb.PullInstructionResponse(), _pull_of),
        (push, fc.decode_push_request, pb.PushReplyRequest(), _push_of),
    ):
        try:
            message.ParseFromString(data)
        except Exception:
            with pytest.raises(DecodeError):
                decode(data)
            continue
        assert decode(data) == build(message)


def _pull_of(message: Any) -> PullResponse:
    return PullResponse(message.task_id, message.server_message)


def _push_of(message: Any) -> PushRequest:
    header = message.header
    return PushRequest(
        header.node_id, message.task_id, message.client_message, header.protocol_version
    )
