"""Properties of the Fleet codec (grpc-rere/rest): round-trips, DecodeError only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
