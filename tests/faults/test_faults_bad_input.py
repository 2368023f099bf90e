"""Bad input on every server endpoint of every transport: an error status, never a crash.

One server (module scope, message limit 64 KiB) takes hypothesis-generated garbage on
every Fleet verb over grpc-rere (raw unary calls with bytes) and rest (raw POSTs), on the
grpc-bidi ``Join`` stream (garbage before and as the reply to an instruction), and raw
bytes on both TCP ports: random bytes, truncated and corrupted valid messages, valid
messages of the wrong kind, other protocol versions, unknown node ids, bodies over the
limit, wrong content types, and slow-drip REST bodies. Each request gets exactly the error
an oracle computes from the bytes (the same decoders the server uses), and the server
keeps serving: an honest 3-round FedAvg run on that same server, with more garbage
arriving throughout, ends with exactly the model of a run on a server that saw none.

Example budgets are fixed and the search is derandomized, so CI runs the same examples
every time.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from fault_tools import FUZZ_TIMING, WAIT, FaultFedAvg, WatchedClientManager
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stamen.errors import ConnectionLost, DecodeError, ProtocolError
from stamen.messages import (
    Code,
    DisconnectRes,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    ReconnectIns,
    Status,
)
from stamen.ndarrays import parameters_to_ndarrays
from stamen.protocol.fleet import (
    ERRORS,
    PROTOCOL_VERSION,
    CreateNodeRequest,
    CreateNodeResponse,
    ErrorKind,
    PullRequest,
    PullResponse,
    PushRequest,
    SimpleRequest,
)
from stamen.server import ServerConfig
from stamen.server.app import run_server
from stamen.server.fleet.handler import FleetTiming
from stamen.server.fleet.rest import body_idle_limit
from stamen.testing import NodeThread, RunningServer, node_threads, running_server
from stamen.testing.conformance import TRANSPORTS, AddClient
from stamen.wire import (
    BIDI_JOIN_METHOD,
    REST_CONTENT_TYPE,
    REST_PREFIX,
    Verb,
    decode_reply,
    encode_instruction,
    encode_reply,
)
from stamen.wire import fleet_codec as fc

MAX = 64 * 1024
"""The garbage server's grpc_max_message_length."""


FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""200 examples per endpoint; the same ones on every run."""

FUZZ_STREAM = settings(FUZZ, max_examples=100)
"""Budget per grpc-bidi case (each example opens a stream and runs an instruction)."""

FUZZ_RAW = settings(FUZZ, max_examples=50)
"""Budget per TCP port for raw bytes."""

# --- what garbage looks like ------------------------------------------------------------------

versions = st.one_of(st.just(PROTOCOL_VERSION), st.integers(0, 2**32 - 1))
node_ids = st.integers(-(2**63), 2**63 - 1)
task_ids = st.integers(0, 2**64 - 1)

TRANSPORT_MESSAGES = [
    encode_instruction(GetPropertiesIns({"x": 1})),
    encode_instruction(FitIns(Parameters([b"\x93NUMPY"], "numpy.ndarray"), {})),
    encode_instruction(ReconnectIns(seconds=3)),
    encode_reply(GetPropertiesRes(Status(Code.OK, ""), {"a": "b"})),
    encode_reply(FitRes(Status(Code.OK, ""), Parameters([b"x"], "numpy.ndarray"), 3, {})),
    encode_reply(EvaluateRes(Status(Code.OK, ""), 0.5, 2, {})),
    encode_reply(DisconnectRes("RECONNECT")),
]
"""Valid ServerMessage and ClientMessage bytes (the wrong kind on every Fleet verb)."""

fleet_messages: st.SearchStrategy[bytes] = st.one_of(
    versions.map(lambda v: fc.encode_create_node_request(CreateNodeRequest(v))),
    st.builds(SimpleRequest, node_ids, versions).map(fc.encode_simple_request),
    st.builds(PullRequest, node_ids, versions).map(fc.encode_pull_request),
    st.builds(
        PushRequest,
        node_ids,
        task_ids,
        st.one_of(st.binary(max_size=32), st.sampled_from(TRANSPORT_MESSAGES)),
        versions,
    ).map(fc.encode_push_request),
    st.builds(CreateNodeResponse, node_ids, st.floats(), st.floats()).map(
        fc.encode_create_node_response
    ),
    st.builds(PullResponse, task_ids, st.binary(max_size=32)).map(fc.encode_pull_response),
    st.sampled_from(TRANSPORT_MESSAGES),
)
"""Valid messages of every kind, with any version and node id."""


@st.composite
def _damaged(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    data = draw(valid)
    if not data:
        return data
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]  # truncated
    index = draw(st.integers(0, len(data) - 1))  # one byte corrupted
    return data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1 :]


def garbage(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, ``valid`` messages and damaged ones (a truncated or corrupted byte).

    Bodies over the limit have tests of their own: gRPC takes ~0.2 s to refuse one, too
    slow for hundreds of examples.
    """
    return st.one_of(st.binary(max_size=300), valid, _damaged(valid))


OVERSIZED = [MAX + 1, 2 * MAX, 16 * MAX]
"""Body sizes over the garbage server's limit."""


def expected_error(verb: Verb, body: bytes) -> ErrorKind | None:
    """What the server must answer ``body`` on ``verb`` with (None: success).

    No garbage names a registered node: the ids are random 63-bit numbers.
    """
    if len(body) > MAX:
        return ErrorKind.TOO_LARGE
    try:
        if verb is Verb.CREATE_NODE:
            version = fc.decode_create_node_request(body).protocol_version
        elif verb is Verb.PULL:
            version = fc.decode_pull_request(body).protocol_version
        elif verb is Verb.PUSH:
            version = fc.decode_push_request(body).protocol_version
        else:
            version = fc.decode_simple_request(body).protocol_version
    except DecodeError:
        return ErrorKind.INVALID_ARGUMENT
    if version != PROTOCOL_VERSION:
        return ErrorKind.VERSION_MISMATCH
    if verb in (Verb.PULL, Verb.PUSH, Verb.HEARTBEAT):
        return ErrorKind.UNKNOWN_NODE
    return None  # CreateNode registers a node; DeleteNode of an unknown node is a no-op


# --- the server and raw clients ---------------------------------------------------------------


@pytest.fixture(scope="module")
def garbage_server() -> Iterator[RunningServer]:
    """The server all garbage goes to (run=False: the honest run is started by its test)."""
    manager = WatchedClientManager()
    with running_server(
        run=False,
        rest=True,
        grpc_max_message_length=MAX,
        timing=FUZZ_TIMING,
        client_manager=manager,
    ) as srv:
        yield srv


def _manager(srv: RunningServer) -> WatchedClientManager:
    manager = srv.server.client_manager()
    assert isinstance(manager, WatchedClientManager)
    return manager


@pytest.fixture(scope="module")
def raw_channel(garbage_server: RunningServer) -> Iterator[grpc.Channel]:
    """A gRPC channel that sends and receives bytes of any size."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(garbage_server.address, options=options)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def http(garbage_server: RunningServer) -> Iterator[httpx.Client]:
    """An HTTP client on the REST port."""
    with httpx.Client(base_url=garbage_server.rest_url, timeout=WAIT) as client:
        yield client


def grpc_call(channel: grpc.Channel, verb: Verb, body: bytes) -> tuple[str, bytes]:
    """``(status name, response)`` of one raw unary call."""
    try:
        response: bytes = channel.unary_unary(verb.grpc_method)(body, timeout=WAIT)
    except grpc.RpcError as exc:
        return exc.code().name, b""
    return "OK", response


def rest_call(
    http: httpx.Client, verb: Verb, body: bytes, content_type: str | None = REST_CONTENT_TYPE
) -> tuple[int, bytes]:
    """``(HTTP status, response)`` of one raw POST."""
    headers = {} if content_type is None else {"content-type": content_type}
    response = http.post(verb.rest_path, content=body, headers=headers)
    return response.status_code, response.content


def assert_serving(channel: grpc.Channel, http: httpx.Client) -> None:
    """An honest node registers and unregisters on grpc-rere and on rest."""
    register = fc.encode_create_node_request(CreateNodeRequest())
    status, created = grpc_call(channel, Verb.CREATE_NODE, register)
    assert status == "OK"
    leave = fc.encode_simple_request(SimpleRequest(fc.decode_create_node_response(created).node_id))
    assert grpc_call(channel, Verb.DELETE_NODE, leave)[0] == "OK"
    code, created = rest_call(http, Verb.CREATE_NODE, register)
    assert code == 200
    leave = fc.encode_simple_request(SimpleRequest(fc.decode_create_node_response(created).node_id))
    assert rest_call(http, Verb.DELETE_NODE, leave)[0] == 200


# --- grpc-rere and rest: every verb -----------------------------------------------------------


@pytest.mark.parametrize("verb", list(Verb), ids=lambda v: v.name)
@FUZZ
@given(body=garbage(fleet_messages))
def test_grpc_rere_answers_garbage_with_the_right_error(
    garbage_server: RunningServer, raw_channel: grpc.Channel, verb: Verb, body: bytes
) -> None:
    """Every Fleet verb over grpc-rere answers garbage with exactly the status its error
    kind maps to (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, NOT_FOUND),
    or succeeds where the bytes happen to be a valid request (a node registered that way
    is unregistered again)."""
    status, response = grpc_call(raw_channel, verb, body)
    kind = expected_error(verb, body)
    event(f"expected {kind.name if kind else 'OK'}")
    assert status == (ERRORS[kind].grpc_status if kind is not None else "OK"), (status, kind)
    if verb is Verb.CREATE_NODE and kind is None:
        leave = SimpleRequest(fc.decode_create_node_response(response).node_id)
        assert grpc_call(raw_channel, Verb.DELETE_NODE, fc.encode_simple_request(leave))[0] == "OK"


CONTENT_TYPES = st.one_of(
    st.just(REST_CONTENT_TYPE),  # one_of picks a branch uniformly: 3 in 5 are right
    st.just(REST_CONTENT_TYPE),
    st.just(f"{REST_CONTENT_TYPE}; charset=binary"),
    st.sampled_from(["application/json", "text/plain", "application/x-protobuf", "", None]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
)


@pytest.mark.parametrize("verb", list(Verb), ids=lambda v: v.name)
@FUZZ
@given(body=garbage(fleet_messages), content_type=CONTENT_TYPES)
def test_rest_answers_garbage_with_the_right_error(
    garbage_server: RunningServer,
    http: httpx.Client,
    verb: Verb,
    body: bytes,
    content_type: str | None,
) -> None:
    """Every Fleet verb over rest answers garbage with exactly the HTTP status its error
    kind maps to (400, 404, 412, 413; 415 for any content type but application/protobuf),
    never a 5xx, or 200 where the bytes happen to be a valid request."""
    code, response = rest_call(http, verb, body, content_type)
    main_type = (content_type or "").split(";")[0].strip()
    if main_type != REST_CONTENT_TYPE:
        event("wrong content type")
        assert code == 415
        return
    kind = expected_error(verb, body)
    event(f"expected {kind.name if kind else 'OK'}")
    assert code == (ERRORS[kind].http_status if kind is not None else 200), (code, kind)
    if verb is Verb.CREATE_NODE and kind is None:
        leave = SimpleRequest(fc.decode_create_node_response(response).node_id)
        assert rest_call(http, Verb.DELETE_NODE, fc.encode_simple_request(leave))[0] == 200


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
    path=st.one_of(
        st.sampled_from([verb.rest_path for verb in Verb]),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz-/", max_size=30).map(
            lambda p: f"{REST_PREFIX}/{p}"
        ),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz-/", max_size=30).map(lambda p: f"/{p}"),
    ),
)
def test_rest_answers_unknown_paths_and_methods_with_4xx(
    garbage_server: RunningServer, http: httpx.Client, method: str, path: str
) -> None:
    """Any other method on a Fleet path is 405; any other path is 404 (and a POST of bytes
    that are no request to a Fleet path is 400)."""
    known = path in {verb.rest_path for verb in Verb}
    response = http.request(
        method, path, content=b"\xff\xff", headers={"content-type": REST_CONTENT_TYPE}
    )
    if known and method == "POST":
        assert response.status_code == 400
    elif known:
        assert response.status_code == 405
    else:
        assert response.status_code == 404


@pytest.mark.parametrize(
    "method",
    [
        "/stamen.v1.Fleet/NoSuchVerb",
        "/stamen.v1.Fleet/",
        "/stamen.v2.Fleet/CreateNode",
        "/flwr.proto.FlowerService/Leave",
        "/",
    ],
)
def test_unknown_grpc_methods_are_unimplemented(raw_channel: grpc.Channel, method: str) -> None:
    """A gRPC method the server does not serve is UNIMPLEMENTED, whatever the body."""
    with pytest.raises(grpc.RpcError) as refused:
        raw_channel.unary_unary(method)(b"\x0a\x02\x08\x01", timeout=WAIT)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- grpc-bidi: the Join stream ---------------------------------------------------------------

bidi_messages = st.one_of(
    st.sampled_from(TRANSPORT_MESSAGES),
    st.builds(
        GetPropertiesRes,
        st.builds(Status, st.sampled_from(list(Code)), st.text(max_size=10)),
        st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=2),
    ).map(encode_reply),
    fleet_messages,
)


def _bidi_exchange(srv: RunningServer, channel: grpc.Channel, when: str, body: bytes) -> str:
    """Open a Join stream, send ``body`` ``when``, check the outcome, close the stream;
    return how the instruction ended."""
    manager = _manager(srv)
    manager.wait_count(lambda n: n == 0, WAIT, "the previous stream is closed")
    outbox: queue.Queue[bytes | None] = queue.Queue()
    call: Any = channel.stream_stream(BIDI_JOIN_METHOD)(iter(outbox.get, None), timeout=WAIT)
    try:
        if when == "before-instruction":
            outbox.put(body)
        manager.wait_count(lambda n: n == 1, WAIT, "the stream is a node")
        (proxy,) = manager.all().values()
        future = proxy.submit(GetPropertiesIns({}), timeout=WAIT)
        assert isinstance(next(call), bytes)  # the instruction
        if when == "as-reply":
            outbox.put(body)
        outcome = future.exception(WAIT)
        status = None
        if len(body) > MAX:
            status = grpc.StatusCode.RESOURCE_EXHAUSTED
            assert isinstance(outcome, ConnectionLost), outcome
        else:
            try:
                reply = decode_reply(body)
            except DecodeError:
                status = grpc.StatusCode.INVALID_ARGUMENT
                assert isinstance(outcome, DecodeError), outcome
            else:
                if isinstance(reply, GetPropertiesRes):
                    assert outcome is None and future.result() == reply
                else:
                    assert isinstance(outcome, ProtocolError), outcome
        if status is not None:
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
            assert ended.value.code() == status
    finally:
        outbox.put(None)
        call.cancel()
    manager.wait_count(lambda n: n == 0, WAIT, "the stream's node is closed")
    return "with a reply" if outcome is None else f"with {type(outcome).__name__}"


WHEN = ["before-instruction", "as-reply"]


@pytest.mark.parametrize("when", WHEN)
@FUZZ_STREAM
@given(body=garbage(bidi_messages))
def test_grpc_bidi_answers_garbage_replies_with_the_right_error(
    garbage_server: RunningServer, raw_channel: grpc.Channel, when: str, body: bytes
) -> None:
    """A Join stream that sends garbage — before the server's first instruction, or as
    the reply to it — ends that instruction exactly as the bytes deserve: bytes that are
    no ClientMessage end the stream with INVALID_ARGUMENT (the instruction fails with
    DecodeError), a reply of another kind fails the instruction with ProtocolError (the
    stream goes on), and a GetPropertiesRes answers it. The server stays up."""
    event(f"instruction ended {_bidi_exchange(garbage_server, raw_channel, when, body)}")


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize("size", OVERSIZED)
def test_grpc_bidi_refuses_oversized_replies(
    garbage_server: RunningServer, raw_channel: grpc.Channel, when: str, size: int
) -> None:
    """A reply over grpc_max_message_length on the Join stream ends the stream with
    RESOURCE_EXHAUSTED, and the instruction fails at once with ConnectionLost."""
    _bidi_exchange(garbage_server, raw_channel, when, b"\x0a" * size)


@pytest.mark.parametrize("size", OVERSIZED)
@pytest.mark.parametrize("verb", list(Verb), ids=lambda v: v.name)
def test_oversized_bodies_are_refused_on_every_verb(
    garbage_server: RunningServer,
    raw_channel: grpc.Channel,
    http: httpx.Client,
    verb: Verb,
    size: int,
) -> None:
    """A body over grpc_max_message_length is RESOURCE_EXHAUSTED on grpc-rere, and 413 on
    rest whether its size is declared (Content-Length) or not (chunked transfer)."""
    body = b"\x0a" * size
    assert grpc_call(raw_channel, verb, body)[0] == "RESOURCE_EXHAUSTED"
    assert rest_call(http, verb, body)[0] == 413
    chunked = http.post(
        verb.rest_path,
        content=iter([body[: size // 2], body[size // 2 :]]),
        headers={"content-type": REST_CONTENT_TYPE},
    )
    assert chunked.status_code == 413
    assert "over the limit" in chunked.text


# --- raw bytes on the TCP ports ---------------------------------------------------------------


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # the server closed first: fine
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


raw_bytes = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=200).map(lambda b: f"POST {Verb.PULL.rest_path} HTTP/1.1\r\n".encode() + b),
    st.binary(max_size=200).map(lambda b: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b),
)


@pytest.mark.parametrize("port_of", ["grpc", "rest"])
@FUZZ_RAW
@given(data=raw_bytes)
def test_raw_bytes_on_the_tcp_ports_never_get_a_5xx(
    garbage_server: RunningServer, port_of: str, data: bytes
) -> None:
    """Bytes that are not HTTP (or broken HTTP/1.1 and HTTP/2 openings) on either port
    get a 4xx or a closed connection, never a 5xx; the connection is closed when the
    client half-closes, so nothing is held."""
    port = garbage_server.port if port_of == "grpc" else garbage_server.rest_port
    assert port is not None
    received = _raw_exchange(port, data)
    if received.startswith(b"HTTP/1.1 "):
        assert received[9:10] == b"4", received[:40]


# --- slow and abandoned REST bodies -----------------------------------------------------------


def _pull_head(content_length: int) -> bytes:
    """The head of a raw HTTP PullInstruction request announcing ``content_length``."""
    return (
        f"POST {Verb.PULL.rest_path} HTTP/1.1\r\nhost: x\r\n"
        f"content-type: {REST_CONTENT_TYPE}\r\ncontent-length: {content_length}\r\n\r\n"
    ).encode()


def test_slow_drip_rest_body_does_not_hold_up_other_requests(
    garbage_server: RunningServer, raw_channel: grpc.Channel, http: httpx.Client
) -> None:
    """A REST request whose body arrives one byte at a time, with a whole honest
    register/unregister exchange (on rest and grpc-rere) between two bytes, holds up no
    one; once its body is complete it is answered like any other (here 404, unknown
    node)."""
    body = fc.encode_pull_request(PullRequest(node_id=424242))
    head = _pull_head(len(body))
    assert garbage_server.rest_port is not None
    with socket.create_connection(("127.0.0.1", garbage_server.rest_port), timeout=WAIT) as sock:
        sock.sendall(head)
        for byte in body:
            assert_serving(raw_channel, http)
            sock.sendall(bytes([byte]))
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:60]


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes ``sock``, and the seconds that took."""
    began = time.monotonic()
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - began


def test_a_stalled_rest_body_is_given_up_after_the_silence_limit(
    garbage_server: RunningServer, raw_channel: grpc.Channel, http: httpx.Client
) -> None:
    """A REST request whose body stops arriving (a stalled or hostile client) is answered
    503 once nothing has come for the fleet's silence limit (at least 5 s), and its
    connection closed: it does not hold a connection and a task for ever."""
    body = fc.encode_pull_request(PullRequest(node_id=424242))
    head = _pull_head(len(body) + 100)
    assert garbage_server.rest_port is not None
    with socket.create_connection(("127.0.0.1", garbage_server.rest_port), timeout=WAIT) as sock:
        sock.sendall(head + body)  # 100 bytes short, and no more will come
        answer, waited = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:60]
    assert b"the body stalled" in answer, answer
    assert body_idle_limit(garbage_server.service.fleet) <= waited < WAIT
    assert_serving(raw_channel, http)


@pytest.mark.parametrize("after_a_request", [False, True])
def test_rest_headers_that_stop_arriving_lose_their_connection_after_the_silence_limit(
    garbage_server: RunningServer,
    raw_channel: grpc.Channel,
    http: httpx.Client,
    after_a_request: bool,
) -> None:
    """A request whose headers never complete (a new connection, or the next request on a
    kept-alive one) is dropped once the silence limit (at least 5 s) has passed: it does
    not hold a connection, and a file descriptor, for ever."""
    body = fc.encode_pull_request(PullRequest(node_id=424242))
    assert garbage_server.rest_port is not None
    with socket.create_connection(("127.0.0.1", garbage_server.rest_port), timeout=WAIT) as sock:
        if after_a_request:
            sock.sendall(_pull_head(len(body)) + body)
            answer = b""
            while b"not registered" not in answer:  # the whole 404 (unknown node)
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 404 "), answer[:60]
        sock.sendall(_pull_head(len(body))[:30])  # and the rest never comes
        received, waited = _until_closed(sock)
    assert received == b""
    # The server's silence clock may start when it sent its answer, a moment before this
    # test's clock: a tenth of a second of slack below the limit.
    assert body_idle_limit(garbage_server.service.fleet) - 0.1 <= waited < WAIT
    assert_serving(raw_channel, http)


def test_an_idle_rest_connection_is_closed_quietly_and_a_cut_request_with_a_warning(
    garbage_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Both lose their connection after the limit; only the request cut short (a broken
    or hostile client) is worth a warning."""
    assert garbage_server.rest_port is not None
    address = ("127.0.0.1", garbage_server.rest_port)
    with (
        caplog.at_level(logging.DEBUG, logger="stamen.server"),
        socket.create_connection(address, timeout=WAIT) as idle,
        socket.create_connection(address, timeout=WAIT) as cut,
    ):
        ours = {f"127.0.0.1:{s.getsockname()[1]}": s for s in (idle, cut)}
        cut.sendall(_pull_head(10)[:30])
        assert _until_closed(idle)[0] == b"" and _until_closed(cut)[0] == b""
    levels = {  # of our two connections (other clients' idle connections close too)
        ours[peer]: r.levelno
        for r in caplog.records
        if "no complete request headers" in r.getMessage()
        for peer in ours
        if f"from {peer}:" in r.getMessage()
    }
    assert levels == {idle: logging.DEBUG, cut: logging.WARNING}


def test_a_rest_long_poll_longer_than_the_header_limit_is_answered() -> None:
    """The header deadline ends when the headers are in: a pull held open by the server
    for longer (its long-poll) is answered, not cut off."""
    timing = FleetTiming(heartbeat_interval=0.2, heartbeat_timeout=1.0, poll_timeout=6.0)
    with (
        running_server(run=False, rest=True, timing=timing) as srv,
        httpx.Client(base_url=f"http://127.0.0.1:{srv.rest_port}", timeout=WAIT) as client,
    ):
        assert srv.rest_port is not None
        assert body_idle_limit(srv.service.fleet) < timing.poll_timeout
        register = fc.encode_create_node_request(CreateNodeRequest())
        code, created = rest_call(client, Verb.CREATE_NODE, register)
        assert code == 200
        node_id = fc.decode_create_node_response(created).node_id
        body = fc.encode_pull_request(PullRequest(node_id=node_id))
        with socket.create_connection(("127.0.0.1", srv.rest_port), timeout=WAIT) as sock:
            sock.sendall(_pull_head(len(body)) + body)
            began = time.monotonic()
            answer = sock.recv(65536)
            waited = time.monotonic() - began
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]
        assert waited >= body_idle_limit(srv.service.fleet)


class _Waiter(logging.Handler):
    """Sets ``seen`` when a record whose message contains ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_rest_body_cut_short_is_not_an_application_error(
    garbage_server: RunningServer,
    raw_channel: grpc.Channel,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that hangs up before its body is complete is no application error: the
    server notes it at debug level, logs no error or traceback (for every such request: a
    way to flood the server's logs), and keeps serving."""
    assert garbage_server.rest_port is not None
    server_log = logging.getLogger("stamen.server")
    with socket.create_connection(("127.0.0.1", garbage_server.rest_port), timeout=WAIT) as sock:
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        waiter = _Waiter(f"rest: {peer} hung up after 2 bytes")
        server_log.addHandler(waiter)
        try:
            with caplog.at_level(logging.DEBUG):
                sock.sendall(_pull_head(50) + b"\x0a\x02")
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                assert waiter.seen.wait(WAIT)
        finally:
            server_log.removeHandler(waiter)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert_serving(raw_channel, http)


# --- the honest run ---------------------------------------------------------------------------


def _honest_run(srv: RunningServer, run: Callable[[], None]) -> list[np.ndarray]:
    """3 nodes (one per transport) on ``srv``; ``run()`` runs the rounds."""
    with node_threads() as nodes:
        for k, transport in zip((1, 2, 3), TRANSPORTS, strict=True):
            kwargs = {"server_address": srv.address_for(transport), "transport": transport}
            nodes.append(NodeThread({**kwargs, "client": AddClient(k).to_client()}).start())
        run()
        outcomes = [node.join(WAIT) for node in nodes]
    assert outcomes == [None] * 3
    return parameters_to_ndarrays(srv.server.parameters)


def _strategy() -> FaultFedAvg:
    return FaultFedAvg(
        start_with=3, min_fit_clients=3, min_evaluate_clients=3, min_available_clients=3
    )


class GarbageHose:
    """A thread that sends garbage to every grpc-rere and rest verb until stopped.

    Only garbage that cannot register a node (a registered node that never pulls would be
    picked for a round and fail it after the heartbeat timeout: correct, but slow).
    """

    def __init__(self, channel: grpc.Channel, http: httpx.Client) -> None:
        self._channel = channel
        self._http = http
        self._stop = threading.Event()
        self._answered = threading.Condition()
        self.sent = 0
        self.wrong: list[tuple[Verb, bytes, object]] = []
        self._thread = threading.Thread(target=self._run, name="garbage-hose", daemon=True)

    def _body(self, rng: random.Random) -> bytes:
        choice = rng.randrange(4)
        if choice == 0:
            return rng.randbytes(rng.randrange(200))
        if choice == 1:
            valid = fc.encode_push_request(PushRequest(rng.getrandbits(62), 1, b"\x22\x00"))
            return valid[: rng.randrange(len(valid))]
        if choice == 2:
            return fc.encode_create_node_request(CreateNodeRequest(rng.randrange(2, 1000)))
        return b"\x0a" * (MAX + 1) if rng.random() < 0.1 else b"\xff"

    def _run(self) -> None:
        rng = random.Random(6)
        while not self._stop.is_set():
            verb = rng.choice(list(Verb))
            body = self._body(rng)
            kind = expected_error(verb, body)
            if kind is None:
                continue
            if rng.random() < 0.5:
                got: object = grpc_call(self._channel, verb, body)[0]
                ok = got == ERRORS[kind].grpc_status
            else:
                got = rest_call(self._http, verb, body)[0]
                ok = got == ERRORS[kind].http_status
            if not ok:
                self.wrong.append((verb, body, got))
            with self._answered:
                self.sent += 1
                self._answered.notify_all()

    def __enter__(self) -> GarbageHose:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # A busy machine may finish the honest run before many requests went out; the
        # hose goes on until at least MIN_GARBAGE were answered (bounded: a server that
        # stopped answering leaves `sent` short and the test fails on it).
        with self._answered:
            self._answered.wait_for(lambda: self.sent >= MIN_GARBAGE, WAIT)
        self._stop.set()
        self._thread.join(WAIT)


MIN_GARBAGE = 21


def test_honest_run_with_garbage_throughout_is_exactly_a_clean_run(
    garbage_server: RunningServer, raw_channel: grpc.Channel, http: httpx.Client
) -> None:
    """On the server that took all the garbage above, 3 honest nodes (one per transport)
    run 3 rounds of FedAvg while a thread keeps sending garbage to every grpc-rere and
    rest verb: every garbage request gets its error, and the final model and the losses are
    exactly those of the same run on a fresh server that saw no garbage."""
    clean = _strategy()
    with running_server(config=ServerConfig(num_rounds=3), strategy=clean, rest=True) as fresh:
        expected = _honest_run(fresh, lambda: fresh.result(WAIT))
        clean_history = fresh.result(WAIT)
    manager = _manager(garbage_server)
    manager.wait_count(lambda n: n == 0, WAIT, "no node is left from the garbage")
    assert_serving(raw_channel, http)
    strategy = _strategy()
    garbage_server.server.set_strategy(strategy)
    histories = []
    with GarbageHose(raw_channel, http) as hose:
        got = _honest_run(
            garbage_server,
            lambda: histories.append(run_server(garbage_server.server, ServerConfig(num_rounds=3))),
        )
    assert not hose.wrong, hose.wrong[:5]
    assert hose.sent >= MIN_GARBAGE, hose.sent
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert histories[0].losses_distributed == clean_history.losses_distributed
    assert [strategy.ks(r) for r in (1, 2, 3)] == [[1, 2, 3]] * 3
