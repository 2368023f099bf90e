"""The Fleet protocol's error contract, identical on grpc-rere and rest."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from stamen.errors import ProtocolError, VersionMismatch
from stamen.protocol.fleet import (
    PROTOCOL_VERSION,
    CreateNodeRequest,
    NodeUnknown,
    PullRequest,
    SimpleRequest,
)
from stamen.testing import RunningServer, running_server
from stamen.transport.base import TransportSettings
from stamen.transport.fleet import Requester
from stamen.transport.grpc_rere import GrpcRereRequester
from stamen.transport.rest import RestRequester
from stamen.wire import REST_PREFIX, Verb, fleet_codec


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(run=False, rest=True) as srv:
        yield srv


@pytest.fixture(params=["grpc-rere", "rest"])
def requester(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[Requester]:
    made: Requester
    settings = TransportSettings(server.address_for(request.param), max_message_length=1 << 20)
    made = GrpcRereRequester(settings) if request.param == "grpc-rere" else RestRequester(settings)
    made.open()
    yield made
    made.close()


def test_other_protocol_version_is_refused_clearly(requester: Requester) -> None:
    """A request of another protocol version gets VersionMismatch naming both versions."""
    body = fleet_codec.encode_create_node_request(CreateNodeRequest(protocol_version=99))
    with pytest.raises(VersionMismatch, match=f"expected {PROTOCOL_VERSION}, received 99"):
        requester.call(Verb.CREATE_NODE, body, 10)


def test_unknown_node_is_told_to_register_again(requester: Requester) -> None:
    """Pull and heartbeat from a node id the server does not know: NodeUnknown (retried by
    the node as a lost connection, which registers again)."""
    with pytest.raises(NodeUnknown, match="node 12345 is not registered"):
        requester.call(Verb.PULL, fleet_codec.encode_pull_request(PullRequest(12345)), 10)
    with pytest.raises(NodeUnknown):
        requester.call(Verb.HEARTBEAT, fleet_codec.encode_simple_request(SimpleRequest(7)), 10)


def test_garbage_body_is_invalid_argument(requester: Requester) -> None:
    """Bytes that are not the verb's message are refused as invalid, and the server stays up."""
    with pytest.raises(ProtocolError, match="invalid"):
        requester.call(Verb.PULL, b"\xff\xfe garbage", 10)
    created = requester.call(
        Verb.CREATE_NODE, fleet_codec.encode_create_node_request(CreateNodeRequest()), 10
    )
    assert fleet_codec.decode_create_node_response(created).node_id != 0


def test_rest_refuses_other_content_types_and_unknown_paths(server: RunningServer) -> None:
    """REST answers 415 to a body that is not application/protobuf and 404 to an unknown verb."""
    with httpx.Client(base_url=server.rest_url, timeout=10) as client:
        wrong = client.post(
            f"{REST_PREFIX}/create-node",
            content=b"{}",
            headers={"content-type": "application/json"},
        )
        assert wrong.status_code == 415
        assert "expected application/protobuf" in wrong.text
        missing = client.post(
            f"{REST_PREFIX}/no-such-verb",
            content=b"",
            headers={"content-type": "application/protobuf"},
        )
        assert missing.status_code == 404
