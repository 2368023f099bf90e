"""The REST server (our own HTTP/1.1 server on h11), over real sockets.

Routes and refusals (404, 405, 415, 413 declared and streamed), keep-alive, pipelining,
chunked bodies, the header and body deadlines, stopping with requests in flight, TLS and
mutual TLS. The deadlines are shortened (the server's floor of 5 s patched to 0.5 s) so
the tests take fractions of a second.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from stamen.errors import ConfigError
from stamen.net.tls import client_ssl_context
from stamen.protocol.fleet import CreateNodeRequest, PullRequest, SimpleRequest
from stamen.server.fleet import rest
from stamen.server.fleet.handler import FleetTiming
from stamen.server.fleet.rest import RestListener, body_idle_limit
from stamen.testing import DevCertificates, RunningServer, generate_certificates, running_server
from stamen.wire import REST_CONTENT_TYPE, Verb
from stamen.wire import fleet_codec as fc

LIMIT = 0.5
"""The header and body deadline of the module's server (seconds)."""
MAX = 64 * 1024
"""The module's server's max message length, hence its body limit."""
WAIT = 10.0
"""Bound of every wait on the server."""

CREATE = fc.encode_create_node_request(CreateNodeRequest())
UNKNOWN_PULL = fc.encode_pull_request(PullRequest(node_id=424242))


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rest, "_MIN_BODY_IDLE", LIMIT)
        timing = FleetTiming(heartbeat_interval=0.1, heartbeat_timeout=LIMIT, poll_timeout=0.2)
        with running_server(run=False, rest=True, timing=timing, grpc_max_message_length=MAX) as s:
            assert body_idle_limit(s.service.fleet) == LIMIT
            yield s


@pytest.fixture
def conn(srv: RunningServer) -> Iterator[socket.socket]:
    assert srv.rest_port is not None
    with socket.create_connection(("127.0.0.1", srv.rest_port), timeout=WAIT) as sock:
        yield sock


def request(
    path: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    content_type: str = REST_CONTENT_TYPE,
    extra: str = "",
) -> bytes:
    """A raw HTTP/1.1 request with a Content-Length."""
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def chunked(path: str, chunks: list[bytes]) -> bytes:
    """A raw HTTP/1.1 request with a chunked body."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {REST_CONTENT_TYPE}\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


class Reader:
    """Reads responses (always framed by Content-Length here) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self._file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := self._file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self._file.read(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    def at_eof(self) -> bool:
        return self._file.read(1) == b""

    def close(self) -> None:
        self._file.close()


@pytest.fixture
def reader(conn: socket.socket) -> Iterator[Reader]:
    r = Reader(conn)
    yield r
    r.close()


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything received until the server closes ``sock``, and the seconds it took."""
    began = time.monotonic()
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - began


def delete(node_id: int) -> bytes:
    return request(Verb.DELETE_NODE.rest_path, fc.encode_simple_request(SimpleRequest(node_id)))


# --- routes and refusals ----------------------------------------------------------------------


def test_refusals_keep_the_connection_alive(conn: socket.socket, reader: Reader) -> None:
    """404 (unknown path), 405 (method), 415 (content type) and 400 (no request) are
    answered with a text/plain reason, each on the same kept-alive connection, the
    refused bodies read and discarded."""
    path = Verb.HEARTBEAT.rest_path
    cases = [
        (request("/api/v0/fleet/nothing", b"abc"), 404, "Not Found"),
        (request(path, b"abc", method="PUT"), 405, "Method Not Allowed"),
        (request(path, b"abc", content_type="application/json"), 415, "expected application"),
        (request(path, b"\xff\xff"), 400, ""),
        (request(path + "?x=1", b"\xff\xff"), 400, ""),  # the query is not the path
    ]
    for raw, status, reason in cases:
        conn.sendall(raw)
        got, headers, body = reader.response()
        assert got == status, (raw, body)
        assert headers["content-type"].startswith("text/plain"), headers
        assert reason in body.decode(), body
        assert "connection" not in headers
    conn.sendall(request(path, b"abc", method="GET"))
    assert reader.response()[1]["allow"] == "POST"


def test_head_requests_get_headers_only(conn: socket.socket) -> None:
    """The answer to a HEAD request has no body (the next answer follows at once)."""
    conn.sendall(request(Verb.PULL.rest_path, method="HEAD") + request("/x", method="HEAD"))
    received = b""
    while received.count(b"\r\n\r\n") < 2:
        chunk = conn.recv(65536)
        assert chunk, received
        received += chunk
    first, second, rest_ = received.split(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405 ") and second.startswith(b"HTTP/1.1 404 ")
    assert rest_ == b""


def test_keep_alive_serves_one_node_on_one_connection(conn: socket.socket, reader: Reader) -> None:
    """A node registers, pulls and leaves on one connection; the protobuf answers."""
    conn.sendall(request(Verb.CREATE_NODE.rest_path, CREATE))
    status, headers, body = reader.response()
    assert (status, headers["content-type"]) == (200, REST_CONTENT_TYPE)
    node_id = fc.decode_create_node_response(body).node_id
    conn.sendall(request(Verb.PULL.rest_path, fc.encode_pull_request(PullRequest(node_id))))
    assert fc.decode_pull_response(reader.response()[2]).task_id == 0  # nothing to do
    conn.sendall(delete(node_id))
    assert reader.response()[0] == 200


def test_pipelined_requests_are_answered_in_order(conn: socket.socket, reader: Reader) -> None:
    """Requests sent at once, before any answer, are answered one after the other."""
    conn.sendall(
        request("/nowhere", b"xyz")
        + request(Verb.CREATE_NODE.rest_path, CREATE)
        + request(Verb.PULL.rest_path, UNKNOWN_PULL)
        + request(Verb.PULL.rest_path, UNKNOWN_PULL, content_type="text/plain")
    )
    statuses = [reader.response() for _ in range(4)]
    assert [s for s, _, _ in statuses] == [404, 200, 404, 415]
    assert b"not registered" in statuses[2][2]
    conn.sendall(delete(fc.decode_create_node_response(statuses[1][2]).node_id))
    assert reader.response()[0] == 200


def test_chunked_bodies_are_read(conn: socket.socket, reader: Reader) -> None:
    """A body in chunks (here of one byte each) is the same body."""
    conn.sendall(chunked(Verb.CREATE_NODE.rest_path, [bytes([b]) for b in CREATE]))
    status, _, body = reader.response()
    assert status == 200
    conn.sendall(delete(fc.decode_create_node_response(body).node_id))
    assert reader.response()[0] == 200


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    conn: socket.socket, reader: Reader
) -> None:
    """413 at once on the head alone, and the connection closed once the client hangs
    up (or after the limit: it is still read meanwhile, so the answer is not lost to a
    reset)."""
    head = request(Verb.PUSH.rest_path)
    conn.sendall(head.replace(b"content-length: 0", b"content-length: %d" % (MAX + 1)))
    status, headers, body = reader.response()
    assert (status, headers["connection"]) == (413, "close")
    assert b"over the limit" in body
    conn.sendall(b"\x0a" * 1000)  # the client goes on sending a while: read and discarded
    began = time.monotonic()
    assert reader.at_eof()
    assert LIMIT * 0.9 <= time.monotonic() - began < WAIT


def test_a_streamed_body_over_the_limit_is_refused(conn: socket.socket, reader: Reader) -> None:
    """A chunked body is refused (413) as soon as it is over the limit."""
    conn.sendall(chunked(Verb.PUSH.rest_path, [b"\x0a" * 4096] * (MAX // 4096 + 1)))
    status, headers, body = reader.response()
    assert (status, headers["connection"]) == (413, "close")
    assert b"over the limit" in body
    conn.shutdown(socket.SHUT_WR)  # the client hangs up: the server closes at once
    assert reader.at_eof()


def test_invalid_http_gets_400_and_the_connection_closed(
    conn: socket.socket, reader: Reader
) -> None:
    conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, _ = reader.response()
    assert (status, headers["connection"]) == (400, "close")
    assert reader.at_eof()


# --- deadlines --------------------------------------------------------------------------------


def test_headers_cut_short_lose_the_connection_with_a_warning(
    conn: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose head stops arriving is dropped after the limit, with a warning."""
    with caplog.at_level(logging.DEBUG, logger="stamen.server"):
        conn.sendall(request(Verb.PULL.rest_path, UNKNOWN_PULL)[:30])
        received, waited = until_closed(conn)
    assert received == b""
    assert LIMIT * 0.9 <= waited < WAIT
    peer = f"127.0.0.1:{conn.getsockname()[1]}"
    ours = [r for r in caplog.records if f"from {peer}:" in r.getMessage()]
    assert [r.levelno for r in ours] == [logging.WARNING]
    assert f"no complete request headers within {LIMIT:g} s" in ours[0].getMessage()


def test_the_header_deadline_restarts_after_each_response(conn: socket.socket) -> None:
    """Each request's head gets the whole limit from the previous response, so a
    connection used more slowly than the limit overall is kept; an idle one is closed."""
    began = time.monotonic()
    reader = Reader(conn)
    try:
        for _ in range(3):
            conn.sendall(request(Verb.PULL.rest_path, UNKNOWN_PULL))
            assert reader.response()[0] == 404
            time.sleep(LIMIT / 2)  # the client is slow, not the server: within the limit
        assert time.monotonic() - began > LIMIT
        conn.sendall(request(Verb.PULL.rest_path, UNKNOWN_PULL))
        assert reader.response()[0] == 404
        assert reader.at_eof()  # then idle: closed
    finally:
        reader.close()


def test_a_stalled_body_is_answered_503_and_closed(conn: socket.socket) -> None:
    conn.sendall(request(Verb.PULL.rest_path, UNKNOWN_PULL + b"\x00" * 10)[:-10])
    received, waited = until_closed(conn)
    assert received.startswith(b"HTTP/1.1 503 "), received
    assert b"the body stalled: nothing for 0.5 s after" in received
    assert LIMIT * 0.9 <= waited < WAIT


def test_a_body_that_keeps_arriving_is_not_cut(conn: socket.socket, reader: Reader) -> None:
    """The body deadline is on silence, not on the whole body: a body sent slowly, each
    byte within the limit, is read however long it takes."""
    raw = request(Verb.PULL.rest_path, UNKNOWN_PULL)
    head, body = raw[: -len(UNKNOWN_PULL)], UNKNOWN_PULL
    conn.sendall(head)
    began = time.monotonic()
    for byte in body:
        time.sleep(LIMIT / 4)
        conn.sendall(bytes([byte]))
    assert time.monotonic() - began > LIMIT
    assert reader.response()[0] == 404


# --- addresses and stopping -------------------------------------------------------------------


def test_an_address_in_use_is_a_config_error(srv: RunningServer) -> None:
    assert srv.rest_port is not None
    with pytest.raises(
        ConfigError, match=f"rest_address: cannot listen on 127.0.0.1:{srv.rest_port}"
    ):
        RestListener(srv.service.fleet, ("127.0.0.1", srv.rest_port), max_body=MAX)


def test_stop_closes_idle_connections_and_lets_a_request_in_flight_finish() -> None:
    """On stop an idle connection is closed at once; a request whose body is still
    arriving gets up to 2 s to finish and is answered (the fleet is closing: 503), with
    its connection closed after."""
    with running_server(run=False, rest=True) as srv:
        assert srv.rest_port is not None
        address = ("127.0.0.1", srv.rest_port)
        raw = request(Verb.PULL.rest_path, UNKNOWN_PULL)
        with (
            socket.create_connection(address, timeout=WAIT) as idle,
            socket.create_connection(address, timeout=WAIT) as busy,
        ):
            busy.sendall(raw[:-2])
            idle.sendall(request("/nowhere"))
            assert idle.recv(65536).startswith(b"HTTP/1.1 404 ")  # both connections are up
            stopper = threading.Thread(target=srv.service.stop)
            stopper.start()
            try:
                assert until_closed(idle)[0] == b""
                busy.sendall(raw[-2:])
                answer, _ = until_closed(busy)
            finally:
                stopper.join(WAIT)
            assert not stopper.is_alive()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"connection: close" in answer.lower()


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs() -> DevCertificates:
    return generate_certificates()


def _post(client: httpx.Client) -> int:
    response = client.post(
        Verb.PULL.rest_path, content=UNKNOWN_PULL, headers={"content-type": REST_CONTENT_TYPE}
    )
    return response.status_code


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_serves_https_and_mutual_tls_refuses_a_client_without_certificate(
    certs: DevCertificates, mutual: bool
) -> None:
    with running_server(
        run=False, rest=True, certificates=certs.server_tuple, require_client_certificate=mutual
    ) as srv:
        with httpx.Client(
            base_url=srv.rest_url, verify=client_ssl_context(certs.ca_cert), timeout=WAIT
        ) as bare:
            if mutual:
                with pytest.raises(httpx.TransportError):
                    _post(bare)
            else:
                assert _post(bare) == 404
        with_cert = client_ssl_context(certs.ca_cert, certs.client_pair)
        with httpx.Client(base_url=srv.rest_url, verify=with_cert, timeout=WAIT) as client:
            assert _post(client) == 404
            assert _post(client) == 404  # kept alive over TLS
        plain = srv.rest_url.replace("https://", "http://")
        with (
            httpx.Client(base_url=plain, timeout=WAIT) as cleartext,
            pytest.raises(httpx.TransportError),
        ):
            _post(cleartext)
