"""Resource limits of the fleet server against hostile peers, over real sockets.

* With node authentication, a request from a key that is not authorized is refused from
  its headers (REST) or metadata (grpc-rere), before its body is read.
* Unauthenticated CreateNode is rate limited: 429 on REST, UNAVAILABLE on gRPC (retry later).
* A REST body dripping a byte at a time is cut at the request deadline, however often
  bytes come; a gRPC call that never sends its request ends at the deadline.
* REST connections from one address are bounded.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from stamen.errors import ConnectionLost
from stamen.protocol.auth import RequestSigner
from stamen.protocol.fleet import CreateNodeRequest
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import generate_node_keys, running_server
from stamen.transport.base import TransportSettings
from stamen.transport.grpc_rere import GrpcRereRequester
from stamen.transport.rest import RestRequester
from stamen.wire import REST_CONTENT_TYPE, Verb
from stamen.wire import fleet_codec as codec


def _head(port: int, path: str, length: int, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"POST {path} HTTP/1.1", "host: x", f"content-type: {REST_CONTENT_TYPE}"]
    lines += [f"content-length: {length}"] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def test_unauthorized_rest_body_is_refused_from_its_headers() -> None:
    keys = generate_node_keys()
    stranger = RequestSigner(*generate_node_keys())
    with running_server(rest=True, authorized_keys=[keys[1]], run=False) as srv:
        assert srv.rest_port is not None
        path = Verb.CREATE_NODE.rest_path
        headers = stranger.headers(f"POST {path}", b"", time.time())
        # 400 MiB announced, none sent: the answer comes from the headers alone.
        sock = _head(srv.rest_port, path, 400 << 20, headers)
        with contextlib.closing(sock):
            assert _status(sock) == 401


def test_unauthorized_grpc_message_is_refused_before_it_is_read() -> None:
    keys = generate_node_keys()
    with running_server(authorized_keys=[keys[1]], run=False) as srv:
        channel = grpc.insecure_channel(srv.address)
        with contextlib.closing(channel):
            push = channel.unary_unary(Verb.PUSH.grpc_method)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                push(bytes(64 << 20), timeout=20)  # no signature at all
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - started < 10


@pytest.mark.parametrize("transport", ["rest", "grpc-rere"])
def test_unauthenticated_create_node_is_rate_limited(transport: str) -> None:
    timing = FleetTiming(create_node_rate=1.0, create_node_burst=5, create_node_global_rate=None)
    body = codec.encode_create_node_request(CreateNodeRequest())
    with running_server(rest=True, timing=timing, run=False) as srv:
        statuses = []
        if transport == "rest":
            assert srv.rest_port is not None
            for _ in range(8):
                sock = _head(srv.rest_port, Verb.CREATE_NODE.rest_path, len(body), {})
                with contextlib.closing(sock):
                    sock.sendall(body)
                    statuses.append(_status(sock))
            assert statuses[:5] == [200] * 5
            assert statuses[5:] == [429] * 3
        else:
            channel = grpc.insecure_channel(srv.address)
            with contextlib.closing(channel):
                create = channel.unary_unary(Verb.CREATE_NODE.grpc_method)
                for _ in range(8):
                    try:
                        create(body, timeout=10)
                        statuses.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        statuses.append(exc.code())
            assert statuses[:5] == [grpc.StatusCode.OK] * 5
            assert statuses[5:] == [grpc.StatusCode.UNAVAILABLE] * 3
        assert len(srv.service.fleet) == 5


@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_a_node_over_the_registration_rate_limit_retries_later(transport: str) -> None:
    """The refusal tells a node to come back (ConnectionLost, which start_client retries
    with backoff), not that its message was too large (which it would give up on)."""
    timing = FleetTiming(create_node_rate=1.0, create_node_burst=1, create_node_global_rate=None)
    body = codec.encode_create_node_request(CreateNodeRequest())
    with running_server(rest=True, timing=timing, run=False) as srv:
        if transport == "rest":
            requester: Any = RestRequester(TransportSettings(srv.rest_url, 1 << 20))
        else:
            requester = GrpcRereRequester(TransportSettings(srv.address, 1 << 20))
        requester.open()
        try:
            requester.call(Verb.CREATE_NODE, body, 10.0)
            with pytest.raises(ConnectionLost, match="too many node registrations") as caught:
                requester.call(Verb.CREATE_NODE, body, 10.0)
            assert caught.value.retryable
        finally:
            requester.close()


DRIP = FleetTiming(heartbeat_interval=0.5, heartbeat_timeout=2.0, request_deadline=3.0)


def test_a_dripping_rest_body_is_cut_at_the_request_deadline() -> None:
    """A byte every 0.5 s keeps the 5 s idle limit from firing; the 3 s deadline ends it."""
    with running_server(rest=True, timing=DRIP, run=False) as srv:
        assert srv.rest_port is not None
        sock = _head(srv.rest_port, Verb.HEARTBEAT.rest_path, 1000, {})
        started = time.monotonic()
        with contextlib.closing(sock):
            sock.settimeout(0.5)
            status = 0
            while time.monotonic() - started < 15 and not status:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\x00")
                with contextlib.suppress(TimeoutError, socket.timeout):
                    status = _status(sock)
            elapsed = time.monotonic() - started
        assert status == 503
        assert 2.5 < elapsed < 6.0, elapsed


def test_a_grpc_call_that_never_sends_ends_at_the_deadline() -> None:
    with running_server(timing=DRIP, run=False) as srv:
        channel = grpc.insecure_channel(srv.address)
        with contextlib.closing(channel):
            heartbeat = channel.stream_unary(Verb.HEARTBEAT.grpc_method)

            def never() -> Iterator[bytes]:
                time.sleep(30)
                yield b""

            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                heartbeat(never(), timeout=25)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 8


def test_rest_connections_per_address_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    timing = FleetTiming(max_connections=100, max_connections_per_peer=4)
    with running_server(rest=True, timing=timing, run=False) as srv:
        assert srv.rest_port is not None
        held = [socket.create_connection(("127.0.0.1", srv.rest_port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            extra = socket.create_connection(("127.0.0.1", srv.rest_port), timeout=5)
            with contextlib.closing(extra):
                assert extra.recv(1) == b""  # closed at once
            # From another address the server still takes connections.
            other = socket.socket()
            other.bind(("127.0.0.2", 0))
            other.settimeout(5)
            other.connect(("127.0.0.1", srv.rest_port))
            with contextlib.closing(other):
                body = codec.encode_create_node_request(CreateNodeRequest())
                lines = f"POST {Verb.CREATE_NODE.rest_path} HTTP/1.1\r\nhost: x\r\n"
                lines += f"content-type: {REST_CONTENT_TYPE}\r\ncontent-length: {len(body)}\r\n\r\n"
                other.sendall(lines.encode() + body)
                assert _status(other) == 200
        finally:
            for sock in held:
                sock.close()
    assert "refusing connections" in caplog.text


def test_at_the_rest_limit_the_oldest_connection_without_a_request_makes_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timing = FleetTiming(max_connections=4, max_connections_per_peer=4)
    with running_server(rest=True, timing=timing, run=False) as srv:
        assert srv.rest_port is not None
        held = []
        try:
            for _ in range(4):  # each sends the start of a request's head, never its end
                sock = socket.create_connection(("127.0.0.1", srv.rest_port), timeout=5)
                sock.sendall(b"POST / HTTP/1.1\r\n")
                held.append(sock)
            other = socket.socket()
            other.bind(("127.0.0.2", 0))
            other.settimeout(5)
            other.connect(("127.0.0.1", srv.rest_port))
            with contextlib.closing(other):
                body = codec.encode_create_node_request(CreateNodeRequest())
                lines = f"POST {Verb.CREATE_NODE.rest_path} HTTP/1.1\r\nhost: x\r\n"
                lines += f"content-type: {REST_CONTENT_TYPE}\r\ncontent-length: {len(body)}\r\n\r\n"
                other.sendall(lines.encode() + body)
                assert _status(other) == 200
            with contextlib.suppress(ConnectionResetError):
                assert held[0].recv(1) == b""  # the oldest was closed to make room
            held[1].setblocking(False)
            with pytest.raises(BlockingIOError):
                held[1].recv(1)  # the others are still open
        finally:
            for sock in held:
                sock.close()
    assert "without a whole request, to make room" in caplog.text
