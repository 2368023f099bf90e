"""Flower 1.12's Fleet API on a Stamen server, driven by raw calls on 127.0.0.1.

What the interop tests cannot steer a real Flower node into: an instruction too large for
one TaskIns, Flower's node authentication request by request (accepted, replayed, forged,
another key's node), and Flower REST requests while node authentication is on.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stamen.errors import MessageTooLarge
from stamen.messages import (
    Code,
    FitIns,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Reply,
    Status,
)
from stamen.protocol.auth import flower_hmac, flower_shared_key
from stamen.protocol.flower_fleet import (
    CreateNodeRequest,
    Node,
    PingRequest,
    PullTaskInsRequest,
    PushTaskResRequest,
    TaskIns,
    TaskMeta,
    TaskRes,
)
from stamen.server.fleet.auth import FLOWER_AUTH_TOKEN_HEADER, FLOWER_PUBLIC_KEY_HEADER
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import RunningServer, running_server
from stamen.wire import FLOWER_REST_CONTENT_TYPE, FlowerCall, encode_instruction
from stamen.wire import flower_codec as codec

WAIT = 20.0
MAX = 64 * 1024
TIMING = FleetTiming(heartbeat_interval=1.0, poll_timeout=0.5)


def call(
    channel: grpc.Channel, flower_call: FlowerCall, body: bytes, metadata: list[tuple[str, str]]
) -> tuple[str, bytes, dict[str, str], str]:
    """(status name, response, initial metadata, details) of one raw unary call."""
    method = channel.unary_unary(flower_call.grpc_method)
    try:
        response, state = method.with_call(body, timeout=WAIT, metadata=metadata or None)
    except grpc.RpcError as exc:
        return exc.code().name, b"", {}, exc.details() or ""
    initial = {k: v for k, v in state.initial_metadata() if isinstance(v, str)}
    return "OK", response, initial, ""


@pytest.fixture
def channel_to() -> Iterator[list[grpc.Channel]]:
    channels: list[grpc.Channel] = []
    yield channels
    for channel in channels:
        channel.close()


def _channel(srv: RunningServer, channels: list[grpc.Channel]) -> grpc.Channel:
    channel = grpc.insecure_channel(srv.address)
    channels.append(channel)
    return channel


def _register(channel: grpc.Channel) -> int:
    body = codec.encode_create_node_request(CreateNodeRequest(30.0))
    status, response, _, details = call(channel, FlowerCall.CREATE_NODE, body, [])
    assert status == "OK", details
    return codec.decode_create_node_response(response).node.node_id


def _pull(channel: grpc.Channel, node_id: int) -> tuple[TaskIns, ...]:
    body = codec.encode_pull_task_ins_request(PullTaskInsRequest(Node(node_id)))
    status, response, _, details = call(channel, FlowerCall.PULL_TASK_INS, body, [])
    assert status == "OK", details
    tasks = codec.decode_pull_task_ins_response(response).task_ins_list
    assert all(isinstance(t, TaskIns) for t in tasks)
    return tasks  # type: ignore[return-value]


def test_an_instruction_too_large_for_one_taskins_fails_with_message_too_large(
    channel_to: list[grpc.Channel],
) -> None:
    """Flower's Fleet API has no frames: an instruction whose TaskIns is over the message
    bound fails at once with MessageTooLarge naming the sizes (also when its Stamen form
    would have fitted), and the node stays connected and gets the next instruction."""
    with running_server(run=False, grpc_max_message_length=MAX, timing=TIMING) as srv:
        channel = _channel(srv, channel_to)
        node_id = _register(channel)
        proxy = srv.server.client_manager().all()[str(node_id)]
        big = FitIns(Parameters([b"\x01" * (MAX - 60)], "custom"), {})
        assert len(encode_instruction(big)) <= MAX  # fits as a Stamen message
        outcome: Future[Reply] = proxy.submit(big, WAIT)
        assert _pull(channel, node_id) == ()  # nothing sendable came within the poll
        error = outcome.exception(WAIT)
        assert isinstance(error, MessageTooLarge), error
        assert "TaskIns" in str(error) and "no frames" in str(error)
        over = proxy.submit(FitIns(Parameters([b"\x01" * (2 * MAX)], "custom"), {}), WAIT)
        assert isinstance(over.exception(WAIT), MessageTooLarge)
        small = proxy.submit(GetPropertiesIns({"a": 1}), WAIT)
        (task,) = _pull(channel, node_id)
        assert task.instruction == GetPropertiesIns({"a": 1})
        meta = TaskMeta(
            "", task.meta.run_id, task.meta.message_type, producer=Node(node_id),
            ancestry=(task.meta.task_id,),
        )  # fmt: skip
        reply = GetPropertiesRes(Status(Code.OK, ""), {"b": 2})
        body = codec.encode_push_task_res_request(
            PushTaskResRequest(Node(node_id), (TaskRes(meta, reply=reply),))
        )
        assert call(channel, FlowerCall.PUSH_TASK_RES, body, [])[0] == "OK"
        assert small.result(WAIT) == reply


# --- node authentication ---------------------------------------------------------------------


def _pem_b64(key: ec.EllipticCurvePublicKey) -> str:
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(pem).decode()


class FlowerAuthPeer:
    """A node authenticating as Flower 1.12's does, written from its documented scheme."""

    def __init__(self, channel: grpc.Channel, key: ec.EllipticCurvePrivateKey) -> None:
        self.channel = channel
        self.key = key
        self.shared: bytes | None = None
        self.node_id = 0

    def metadata(self, body: bytes | None) -> list[tuple[str, str]]:
        out = [(FLOWER_PUBLIC_KEY_HEADER, _pem_b64(self.key.public_key()))]
        if body is not None:
            assert self.shared is not None
            token = base64.urlsafe_b64encode(flower_hmac(self.shared, body)).decode()
            out.append((FLOWER_AUTH_TOKEN_HEADER, token))
        return out

    def create(self) -> tuple[str, str]:
        body = codec.encode_create_node_request(CreateNodeRequest(30.0))
        status, response, initial, details = call(
            self.channel, FlowerCall.CREATE_NODE, body, self.metadata(None)
        )
        if status == "OK":
            self.node_id = codec.decode_create_node_response(response).node.node_id
            server_key = serialization.load_pem_public_key(
                base64.urlsafe_b64decode(initial[FLOWER_PUBLIC_KEY_HEADER])
            )
            assert isinstance(server_key, ec.EllipticCurvePublicKey)
            self.shared = flower_shared_key(self.key, server_key)
        return status, details

    def ping_body(self, node_id: int | None = None) -> bytes:
        node = Node(self.node_id if node_id is None else node_id)
        return codec.encode_ping_request(PingRequest(node, 30.0))

    def send(self, body: bytes, metadata: list[tuple[str, str]] | None = None) -> tuple[str, str]:
        status, _, _, details = call(
            self.channel,
            FlowerCall.PING,
            body,
            self.metadata(body) if metadata is None else metadata,
        )
        return status, details


@pytest.fixture
def auth_server() -> Iterator[tuple[RunningServer, list[ec.EllipticCurvePrivateKey]]]:
    keys = [ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256R1())]
    with running_server(
        run=False, rest=True, authorized_keys=[k.public_key() for k in keys]
    ) as srv:
        yield srv, keys


def test_flower_authentication_accepts_authorized_keys_on_every_curve_and_refuses_forgeries(
    auth_server: tuple[RunningServer, list[ec.EllipticCurvePrivateKey]],
    channel_to: list[grpc.Channel],
) -> None:
    """Authorized keys on P-384 and P-256 register (the server answers each with its own
    key on the node's curve) and their HMAC'd requests are served. Refused with
    UNAUTHENTICATED: an unknown key, no key, a wrong HMAC, no HMAC, and an authorized key
    driving another key's node. A request captured and sent again is accepted: Flower's
    scheme has no nonce or timestamp (docs/security.md)."""
    srv, keys = auth_server
    channel = _channel(srv, channel_to)
    first, second = (FlowerAuthPeer(channel, k) for k in keys)
    assert first.create() == ("OK", "")
    assert second.create() == ("OK", "")
    assert first.send(first.ping_body())[0] == "OK"
    assert second.send(second.ping_body())[0] == "OK"
    replay = first.metadata(first.ping_body())
    assert first.send(first.ping_body(), replay)[0] == "OK"  # replayable, as in Flower
    stranger = FlowerAuthPeer(channel, ec.generate_private_key(ec.SECP384R1()))
    status, details = stranger.create()
    assert (status, "is not authorized" in details) == ("UNAUTHENTICATED", True)
    body = first.ping_body()
    assert call(channel, FlowerCall.PING, body, [])[0] == "UNAUTHENTICATED"
    forged = [*first.metadata(None), (FLOWER_AUTH_TOKEN_HEADER, "AAAA")]
    assert first.send(body, forged)[0] == "UNAUTHENTICATED"
    assert first.send(body, first.metadata(None))[0] == "UNAUTHENTICATED"
    other = first.ping_body(second.node_id)
    status, details = first.send(other)
    assert status == "UNAUTHENTICATED" and "another key" in details


def test_flower_rest_is_refused_while_node_authentication_is_on(
    auth_server: tuple[RunningServer, list[ec.EllipticCurvePrivateKey]],
) -> None:
    """Flower 1.12's REST node cannot authenticate: with ``authorized_keys`` set, its
    requests get 401 saying so."""
    srv, _ = auth_server
    response = httpx.post(
        f"{srv.rest_url}{FlowerCall.CREATE_NODE.rest_path}",
        content=codec.encode_create_node_request(CreateNodeRequest(30.0)),
        headers={"content-type": FLOWER_REST_CONTENT_TYPE},
        timeout=WAIT,
    )
    assert response.status_code == 401
    assert b"grpc-rere" in response.content


def test_given_server_keys_name_the_curve_nodes_must_use(channel_to: list[grpc.Channel]) -> None:
    """``server_keys`` given: the server answers CreateNode with that public key, and a node
    key on another curve is refused with a reason naming both curves."""
    own = ec.generate_private_key(ec.SECP384R1())
    node_384 = ec.generate_private_key(ec.SECP384R1())
    node_256 = ec.generate_private_key(ec.SECP256R1())
    with running_server(
        run=False,
        authorized_keys=[node_384.public_key(), node_256.public_key()],
        server_keys=(own, own.public_key()),
    ) as srv:
        channel = _channel(srv, channel_to)
        peer = FlowerAuthPeer(channel, node_384)
        assert peer.create() == ("OK", "")
        assert peer.shared == flower_shared_key(own, node_384.public_key())
        assert peer.send(peer.ping_body())[0] == "OK"
        status, details = FlowerAuthPeer(channel, node_256).create()
        assert status == "UNAUTHENTICATED" and "secp256r1" in details and "secp384r1" in details


def test_server_keys_without_authorized_keys_are_a_config_error() -> None:
    from stamen.errors import ConfigError

    own = ec.generate_private_key(ec.SECP384R1())
    with (
        pytest.raises(ConfigError, match="server_keys"),
        running_server(run=False, server_keys=(own, own.public_key())),
    ):
        pass  # pragma: no cover


def test_the_hmac_may_cover_the_deterministic_serialization_of_the_request() -> None:
    """Flower's node MACs ``SerializeToString(deterministic=True)`` while the bytes it
    sends may order map entries otherwise: the server also accepts an HMAC over the
    request's deterministic form."""
    from stamen.server.fleet.auth import AuthorizedKeys, FlowerAuthenticator

    node = ec.generate_private_key(ec.SECP384R1())
    auth = FlowerAuthenticator(AuthorizedKeys([node.public_key()]))
    header = {FLOWER_PUBLIC_KEY_HEADER: _pem_b64(node.public_key())}
    _, answer = auth.verify(True, b"", lambda: b"", header)
    server_key = serialization.load_pem_public_key(base64.urlsafe_b64decode(dict(answer)[
        FLOWER_PUBLIC_KEY_HEADER
    ]))  # fmt: skip
    assert isinstance(server_key, ec.EllipticCurvePublicKey)
    shared = flower_shared_key(node, server_key)
    canonical = b"canonical form"
    token = base64.urlsafe_b64encode(flower_hmac(shared, canonical)).decode()
    headers = {**header, FLOWER_AUTH_TOKEN_HEADER: token}
    auth.verify(False, b"as sent", lambda: canonical, headers)
    from stamen.errors import AuthError

    with pytest.raises(AuthError, match="HMAC"):
        auth.verify(False, b"as sent", lambda: b"something else", headers)


def test_pulls_are_long_polls_answered_when_work_arrives(channel_to: list[grpc.Channel]) -> None:
    """A Flower node's PullTaskIns is held until an instruction arrives (within the poll
    timeout), so an idle Flower node gets work without its 3 s sleep between empty pulls."""
    timing = FleetTiming(heartbeat_interval=1.0, poll_timeout=10.0)
    with running_server(run=False, timing=timing) as srv:
        channel = _channel(srv, channel_to)
        node_id = _register(channel)
        proxy = srv.server.client_manager().all()[str(node_id)]
        got: list[tuple[TaskIns, ...]] = []
        puller = threading.Thread(target=lambda: got.append(_pull(channel, node_id)))
        puller.start()
        node = srv.service.fleet.state.get(str(node_id))
        assert node is not None
        polling, deadline = threading.Event(), time.monotonic() + WAIT
        while node.polls == 0 and time.monotonic() < deadline:  # bounded readiness wait
            polling.wait(0.005)
        assert node.polls == 1, "the pull is not being held"
        proxy.submit(GetPropertiesIns({"late": True}), WAIT)
        puller.join(WAIT)
        assert not puller.is_alive()
        (task,) = got[0]
        assert task.instruction == GetPropertiesIns({"late": True})
