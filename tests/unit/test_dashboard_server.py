"""The dashboard's web server: routes, the token and host checks, and its bounds."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stamen.errors import ConfigError
from stamen.server.dashboard import (
    TOKEN_ENV,
    DashboardServer,
    DashboardState,
    dashboard_address,
    start_dashboard,
)
from stamen.server.events import NodeJoined, RoundStarted, RunEvents, RunStarted


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start DashboardServers; each is stopped at teardown."""
    started: list[DashboardServer] = []

    def start(address: str = "127.0.0.1:0", **kwargs: Any) -> DashboardServer:
        server = DashboardServer(kwargs.pop("state", None) or DashboardState(), address, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _get(
    server: DashboardServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_routes(serve: Any) -> None:
    state = DashboardState()
    state(RunStarted(3, "FedAvg"))
    server = serve(state=state)
    status, headers, body = _get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"static/uPlot.iife.min.js" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    status, headers, body = _get(server, "/api/state")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["run"]["num_rounds"] == 3
    status, _, body = _get(server, "/api/history")
    assert status == 200 and json.loads(body)["rounds"] == []
    for name in ("app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"):
        status, _, body = _get(server, f"/static/{name}")
        assert status == 200 and body
    assert _get(server, "/static/uPlot.LICENSE")[0] == 404
    assert _get(server, "/static/../state.py")[0] == 404
    assert _get(server, "/nope")[0] == 404
    status, headers, _ = _get(server, "/api/state", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = _get(server, "/api/state", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_many_nodes_are_served_whole_on_one_kept_alive_connection(serve: Any) -> None:
    """A browser polls on one connection: 2,000 nodes, 20 polls, every answer whole."""
    state = DashboardState()
    for i in range(2000):
        state(NodeJoined(f"node-{i}", "grpc-rere", f"ipv4:10.0.{i // 256}.{i % 256}:5000"))
    server = serve(state=state)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(20):  # one keep-alive connection, as a browser polling
        conn.request("GET", "/api/state")
        response = conn.getresponse()
        nodes = json.loads(response.read())["nodes"]["list"]
        assert response.status == 200 and len(nodes) == 2000
        assert {n["id"] for n in nodes} == {f"node-{i}" for i in range(2000)}
    conn.close()


def test_loopback_answers_to_loopback_host_names_only(serve: Any) -> None:
    """Without a token, a page on another site cannot read it through DNS rebinding."""
    server = serve()
    assert server.token is None
    for host in (f"127.0.0.1:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert _get(server, "/api/state", {"Host": host})[0] == 200
    status, _, body = _get(server, "/api/state", {"Host": f"evil.example:{server.port}"})
    assert status == 403 and b"localhost only" in body


def test_a_token_is_checked_on_every_request(serve: Any) -> None:
    server = serve(token="s3cret-token")
    for path in ("/", "/api/state", "/api/history", "/api/events", "/static/app.js"):
        status, headers, body = _get(server, path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
        assert b"token" in body
        assert _get(server, path + "?token=wrong")[0] == 401
        assert _get(server, path, {"Authorization": "Bearer wrong"})[0] == 401
    assert _get(server, "/api/state?token=s3cret-token")[0] == 200
    assert _get(server, "/api/state", {"Authorization": "Bearer s3cret-token"})[0] == 200
    # With a token, any Host is fine (a proxy or a remote browser).
    assert _get(server, "/?token=s3cret-token", {"Host": "dash.example"})[0] == 200
    assert server.url.endswith("/?token=s3cret-token")


def test_another_address_requires_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    server = DashboardServer(DashboardState(), "0.0.0.0:0")
    assert server.generated_token and server.token is not None and len(server.token) >= 32
    assert DashboardServer(DashboardState(), "[::]:0").token is not None
    assert DashboardServer(DashboardState(), "localhost:0").token is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    server = DashboardServer(DashboardState(), "0.0.0.0:0")
    assert server.token == "from-env" and not server.generated_token
    with pytest.raises(ConfigError, match="empty"):
        DashboardServer(DashboardState(), "127.0.0.1:0", token=" ")


def test_generated_token_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    caplog.set_level("INFO", logger="stamen.server")
    dashboard = start_dashboard(RunEvents(), "0.0.0.0:0")
    try:
        assert dashboard.server.token is not None
        assert f"?token={dashboard.server.token}" in caplog.text
    finally:
        dashboard.stop()
    caplog.clear()
    dashboard = start_dashboard(RunEvents(), "127.0.0.1:0", token="given-token")
    try:
        assert "given-token" not in caplog.text  # a token given is not logged
        assert "dashboard: open http://127.0.0.1:" in caplog.text
    finally:
        dashboard.stop()


def test_addresses() -> None:
    assert dashboard_address("8080") == "127.0.0.1:8080"
    assert dashboard_address(":8080") == "127.0.0.1:8080"
    assert dashboard_address("0.0.0.0:9000") == "0.0.0.0:9000"
    assert dashboard_address("[::1]:9000") == "[::1]:9000"
    with pytest.raises(ConfigError, match="dashboard_address"):
        dashboard_address("nowhere")


def test_an_address_in_use_is_a_config_error(serve: Any) -> None:
    server = serve()
    with pytest.raises(ConfigError, match="cannot listen"):
        start_dashboard(RunEvents(), f"127.0.0.1:{server.port}")


def test_connections_are_limited_and_idle_ones_closed(serve: Any) -> None:
    server = serve(max_connections=4, request_limit=0.5)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    time.sleep(0.1)
    extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert extra.recv(100).startswith(b"HTTP/1.1 503")
    extra.close()
    # A client that sends nothing (or half a request) is closed after request_limit.
    idle[0].sendall(b"GET /api/state HTTP/1.1\r\nHost: localhost\r\n")
    began = time.monotonic()
    for sock in idle:
        assert sock.recv(100) == b""
        sock.close()
    assert time.monotonic() - began < 3
    assert _get(server, "/api/state")[0] == 200


def test_requests_with_a_body_or_garbage_are_refused(serve: Any) -> None:
    server = serve()
    for request in (
        b"POST /api/state HTTP/1.1\r\nHost: localhost\r\ncontent-length: 5\r\n\r\nhello",
        b"\x16\x03\x01 not http at all\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert not data.startswith(b"HTTP/1.1 200"), data[:100]
    assert _get(server, "/api/state")[0] == 200


def _read_events(sock: socket.socket, until: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_event_stream_sends_changes_and_ends_when_the_dashboard_stops() -> None:
    bus = RunEvents()
    dashboard = start_dashboard(bus, "127.0.0.1:0")
    try:
        sock = socket.create_connection(("127.0.0.1", dashboard.server.port), timeout=10)
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = _read_events(sock, b"event: history")
        assert b"content-type: text/event-stream" in first.lower()
        assert b"event: state" in first
        bus.publish(RunStarted(7, "FedProx"))
        bus.publish(RoundStarted(1, "fit", 2))
        update = _read_events(sock, b'"num_rounds":7')
        assert b"FedProx" in update
        began = time.monotonic()
        dashboard.stop()
        rest = _read_events(sock, b"\r\n0\r\n\r\n")
        assert b"event: end" in rest
        assert sock.recv(100) == b""  # closed
        assert time.monotonic() - began < 5
        sock.close()
    finally:
        dashboard.stop()


def test_event_streams_are_limited(serve: Any) -> None:
    server = serve(max_streams=2)
    streams = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        _read_events(sock, b"event: state")
        streams.append(sock)
    assert _get(server, "/api/events")[0] == 503
    assert _get(server, "/api/state")[0] == 200
    for sock in streams:
        sock.close()


def test_a_stream_client_that_reads_nothing_is_cut_off(serve: Any) -> None:
    """A browser that stops reading its event stream frees its place within write_limit."""
    state = DashboardState()
    for i in range(2000):
        state(NodeJoined(f"node-{i:040}", "grpc-rere", "ipv4:10.0.0.1:5000"))
    server = serve(state=state, max_streams=1, write_limit=0.5)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    deadline = time.monotonic() + 20
    round_number = 0
    try:
        while _stream_status(server) == 503:
            assert time.monotonic() < deadline, "the stalled stream was never cut off"
            round_number += 1
            state(RoundStarted(round_number, "fit", 2000))  # a change: ~700 KB to send
            time.sleep(0.05)
        assert round_number > 0  # it was open, then cut off
    finally:
        stalled.close()


def _stream_status(server: DashboardServer) -> int:
    """The status a new event stream is answered with (the stream is closed at once)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return int(_read_events(sock, b"\r\n").split()[1])


def test_start_server_refuses_a_bad_dashboard_address_cleanly(serve: Any) -> None:
    """Nothing is left running (or unclosed) when the dashboard cannot start."""
    from stamen.server import start_server

    with pytest.raises(ConfigError, match="dashboard_address"):
        start_server(server_address="127.0.0.1:0", dashboard_address="nowhere")
    taken = serve()
    with pytest.raises(ConfigError, match="cannot listen"):
        start_server(server_address="127.0.0.1:0", dashboard_address=f"127.0.0.1:{taken.port}")
