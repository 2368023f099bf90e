"""A malicious or broken server: ``start_client`` raises a clear error, it never hangs.

Fake servers (a raw gRPC server for grpc-bidi and grpc-rere, a tiny HTTP server for rest)
answer with garbage where an instruction or a Fleet response is due, with responses over
the node's message limit or without end, with trickled responses, with timing values that
make no sense, with frames announcing more than the node takes, with long-polls held for
an hour, or with nothing at all. Every wait is bounded.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc
import numpy as np
import pytest
from fault_tools import WAIT, FakeGrpcServer, FakeHttpServer, HttpBehaviour, http_reply

from stamen.errors import (
    AuthError,
    ConnectError,
    DecodeError,
    MessageTooLarge,
    ProtocolError,
    Timeout,
)
from stamen.messages import FitIns, ReconnectIns
from stamen.ndarrays import ndarrays_to_parameters
from stamen.protocol import fleet_client
from stamen.protocol.fleet import CreateNodeRequest, CreateNodeResponse, PullResponse
from stamen.testing import NodeThread, generate_node_keys
from stamen.testing.conformance import AddClient
from stamen.transport.base import TransportSettings, default_max_model_bytes
from stamen.transport.grpc_rere import GrpcRereRequester
from stamen.transport.rest import RestRequester
from stamen.wire import (
    BIDI_METHOD_NAME,
    BIDI_SERVICE_NAME,
    FRAMES_METADATA,
    Verb,
    decode_instruction,
    encode_instruction,
)
from stamen.wire import fleet_codec as fc

LIMIT = 64 * 1024
"""The nodes' grpc_max_message_length here."""

BOUND = 10.0
"""start_client must have raised within this many seconds (it takes well under one)."""

_FIT = encode_instruction(
    FitIns(ndarrays_to_parameters([np.zeros(100, dtype=np.float32)]), {"lr": 0.1})
)
GARBAGE_INSTRUCTIONS = {
    "corrupt": b"\xff\xff\xff\xff",
    "truncated": _FIT[:-7],
    "no-instruction": b"",
    "unknown-field-only": b"\x78\x01",
}
"""ServerMessage bytes that are not an instruction."""


def _registered(poll_timeout: float = 1.0, heartbeat_interval: float = 1.0) -> bytes:
    return fc.encode_create_node_response(CreateNodeResponse(77, heartbeat_interval, poll_timeout))


def _node(address: str, transport: str, **extra: Any) -> NodeThread:
    return NodeThread(
        {
            "server_address": address,
            "transport": transport,
            "client": AddClient(1).to_client(),
            "grpc_max_message_length": LIMIT,
            "max_retries": 0,
            **extra,
        }
    ).start()


def _raises_within(node: NodeThread, error: type[BaseException], match: str = "") -> str:
    started = time.monotonic()
    outcome = node.join(WAIT)
    assert isinstance(outcome, error), repr(outcome)
    assert time.monotonic() - started < BOUND
    assert match in str(outcome), outcome
    return str(outcome)


def _fleet(create: bytes, pull: bytes) -> dict[Verb, Callable[[bytes], bytes]]:
    return {
        Verb.CREATE_NODE: lambda _: create,
        Verb.PULL: lambda _: pull,
        Verb.PUSH: lambda _: b"",
        Verb.HEARTBEAT: lambda _: b"",
        Verb.DELETE_NODE: lambda _: b"",
    }


def _answer(body: bytes) -> HttpBehaviour:
    return lambda handler, _request, _stop: http_reply(handler, body)


def _http_fleet(create: bytes, pull: bytes) -> FakeHttpServer:
    return FakeHttpServer({verb: _answer(out(b"")) for verb, out in _fleet(create, pull).items()})


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register fake servers to close at teardown (after the node has ended)."""
    servers: list[Any] = []
    yield lambda server: servers.append(server) or server
    for server in servers:
        server.close()


@pytest.mark.parametrize("case", list(GARBAGE_INSTRUCTIONS))
@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_garbage_instruction_makes_start_client_raise(
    closing: Callable[[Any], Any], transport: str, case: str
) -> None:
    """A server whose instruction is not a ServerMessage with one instruction (corrupt,
    truncated, empty, unknown fields only) makes start_client raise DecodeError at once,
    on every transport (not retried: the same server would send the same bytes)."""
    garbage = GARBAGE_INSTRUCTIONS[case]
    with pytest.raises(DecodeError):
        decode_instruction(garbage)
    if transport == "grpc-bidi":

        def join(requests: Iterator[bytes], stop: Any) -> Iterator[bytes]:
            yield garbage
            stop.wait(WAIT)

        address = closing(FakeGrpcServer(join=join)).address
    else:
        pull = fc.encode_pull_response(PullResponse(1, garbage))
        if transport == "grpc-rere":
            address = closing(FakeGrpcServer(fleet=_fleet(_registered(), pull))).address
        else:
            address = closing(_http_fleet(_registered(), pull)).url
    _raises_within(_node(address, transport), DecodeError, "ServerMessage")


@pytest.mark.parametrize("verb", [Verb.CREATE_NODE, Verb.PULL], ids=lambda v: v.name)
@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_garbage_fleet_response_makes_start_client_raise(
    closing: Callable[[Any], Any], transport: str, verb: Verb
) -> None:
    """A Fleet response that does not decode (to CreateNode or PullInstruction) makes
    start_client raise DecodeError naming the message, at once."""
    create = b"\xff\xff" if verb is Verb.CREATE_NODE else _registered()
    pull = b"\xff\xff"
    name = "CreateNodeResponse" if verb is Verb.CREATE_NODE else "PullInstructionResponse"
    if transport == "grpc-rere":
        address = closing(FakeGrpcServer(fleet=_fleet(create, pull))).address
    else:
        address = closing(_http_fleet(create, pull)).url
    _raises_within(_node(address, transport), DecodeError, name)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("poll_timeout", math.nan),
        ("poll_timeout", math.inf),
        ("poll_timeout", -1.0),
        ("poll_timeout", 1e9),
        ("heartbeat_interval", -0.5),
        ("heartbeat_interval", 1e-9),
        ("heartbeat_interval", math.inf),
    ],
)
@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_nonsense_timing_from_the_server_is_refused(
    closing: Callable[[Any], Any], transport: str, field: str, value: float
) -> None:
    """A CreateNodeResponse whose poll_timeout or heartbeat_interval is not a number of
    seconds in [0.01, 3600] makes start_client raise ProtocolError naming the field (before
    the fix: a raw ValueError/OverflowError from httpx or grpc for NaN/inf, heartbeats in a
    busy loop for a negative or tiny interval, a pull held open for 30 years for 1e9)."""
    timing = {"poll_timeout": 1.0, "heartbeat_interval": 1.0, field: value}
    create = _registered(**timing)
    pull = fc.encode_pull_response(PullResponse(1, encode_instruction(ReconnectIns(0))))
    if transport == "grpc-rere":
        address = closing(FakeGrpcServer(fleet=_fleet(create, pull))).address
    else:
        address = closing(_http_fleet(create, pull)).url
    _raises_within(_node(address, transport), ProtocolError, f"CreateNode: {field}")


def _endless(handler: BaseHTTPRequestHandler, _body: bytes, stop: Any) -> None:
    handler.send_response(200)
    handler.send_header("content-type", "application/protobuf")
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    chunk = b"\x00" * 65536
    for _ in range(16 * 1024):  # 1 GiB at most, unless the node hangs up first
        if stop.is_set():
            return
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_instruction_over_the_limit_makes_start_client_raise(
    closing: Callable[[Any], Any], transport: str
) -> None:
    """An instruction over the node's grpc_max_message_length makes start_client raise
    MessageTooLarge at once; on rest the server sends a body without end (chunked), and
    the node stops reading at the limit (before the fix it read on, without bound, and
    used gigabytes of memory)."""
    big = b"\x00" * (2 * LIMIT)
    if transport == "grpc-bidi":

        def join(requests: Iterator[bytes], stop: Any) -> Iterator[bytes]:
            yield big
            stop.wait(WAIT)

        address = closing(FakeGrpcServer(join=join)).address
    elif transport == "grpc-rere":
        address = closing(FakeGrpcServer(fleet=_fleet(_registered(), big))).address
    else:
        server = FakeHttpServer(
            {
                Verb.CREATE_NODE: _answer(_registered()),
                Verb.PULL: _endless,
                Verb.DELETE_NODE: _answer(b""),
            }
        )
        address = closing(server).url
    _raises_within(_node(address, transport), MessageTooLarge)


def _trickle(handler: BaseHTTPRequestHandler, _body: bytes, stop: Any) -> None:
    handler.send_response(200)
    handler.send_header("content-length", "1000")
    handler.end_headers()
    for _ in range(1000):
        handler.wfile.write(b"\x00")
        handler.wfile.flush()
        if stop.wait(0.05):  # the fault: one byte every 50 ms (50 s for the body)
            return


def test_trickled_rest_response_times_out_at_the_request_deadline(
    closing: Callable[[Any], Any],
) -> None:
    """A REST server that trickles its response (a byte every 50 ms: each read is quick,
    the whole takes 50 s) is cut off at the request's deadline with Timeout (retried like
    a lost connection). Before the fix httpx waited for as long as bytes kept coming."""
    server = closing(FakeHttpServer({Verb.CREATE_NODE: _trickle}))
    requester = RestRequester(TransportSettings(server.url, max_message_length=LIMIT))
    requester.open()
    started = time.monotonic()
    try:
        with pytest.raises(Timeout, match="not complete within 1 s"):
            requester.call(Verb.CREATE_NODE, fc.encode_create_node_request(CreateNodeRequest()), 1)
    finally:
        requester.close()
    assert time.monotonic() - started < 1.0 + BOUND


def _silent(handler: BaseHTTPRequestHandler, _body: bytes, stop: Any) -> None:
    stop.wait(WAIT)


@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_silent_fleet_server_times_out_each_request(
    closing: Callable[[Any], Any], transport: str
) -> None:
    """A Fleet server that accepts a request and never answers is given up on at the
    request's timeout with Timeout (start_client uses 30 s for CreateNode, PushReply,
    Heartbeat and DeleteNode, and poll_timeout + 15 s for a long-poll, then reconnects
    under max_retries / max_wait_time)."""
    body = fc.encode_create_node_request(CreateNodeRequest())
    settings: TransportSettings
    if transport == "grpc-rere":

        def never(_request: bytes) -> bytes:
            fake.stop.wait(WAIT)
            return b""

        fake = closing(FakeGrpcServer(fleet={Verb.CREATE_NODE: never}))
        settings = TransportSettings(fake.address, max_message_length=LIMIT)
        requester: Any = GrpcRereRequester(settings)
    else:
        fake = closing(FakeHttpServer({Verb.CREATE_NODE: _silent}))
        requester = RestRequester(TransportSettings(fake.url, max_message_length=LIMIT))
    requester.open()
    started = time.monotonic()
    try:
        with pytest.raises(Timeout):
            requester.call(Verb.CREATE_NODE, body, 1)
    finally:
        requester.close()
        fake.stop.set()
    assert time.monotonic() - started < 1.0 + BOUND


def test_silent_bidi_server_holds_the_node_until_it_goes_away(
    closing: Callable[[Any], Any],
) -> None:
    """A grpc-bidi server that accepts the Join stream and never writes keeps the node
    waiting for an instruction, like a server with no work for it (Flower's node does the
    same; keepalive pings would notice a dead peer). As soon as that server goes away the
    node notices and, with max_retries=0, start_client raises ConnectError."""

    def join(requests: Iterator[bytes], stop: Any) -> Iterator[bytes]:
        stop.wait(WAIT)
        yield from ()

    fake = FakeGrpcServer(join=join)
    node = _node(fake.address, "grpc-bidi")
    try:
        assert fake.joined.wait(WAIT)
        assert not node.done.is_set()
    finally:
        fake.close()
    _raises_within(node, ConnectError, "gave up")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _claim(total: int) -> bytes:
    """A first ``Frame`` (field 16 of ServerMessage) announcing a message of ``total``
    bytes, with 16 bytes of it."""
    chunk = b"\x00" * 16
    inner = b"\x08" + _varint(total) + b"\x10\x00" + b"\x1a" + _varint(len(chunk)) + chunk
    return _varint(16 << 3 | 2) + _varint(len(inner)) + inner


def _serving(closing: Callable[[Any], Any], transport: str, instruction: bytes) -> str:
    """The address of a fake server whose first instruction is ``instruction``."""
    if transport == "grpc-bidi":

        def join(requests: Iterator[bytes], stop: Any) -> Iterator[bytes]:
            yield instruction
            stop.wait(WAIT)

        address: str = closing(FakeGrpcServer(join=join)).address
        return address
    pull = fc.encode_pull_response(PullResponse(1, instruction))
    if transport == "grpc-rere":
        address = closing(FakeGrpcServer(fleet=_fleet(_registered(), pull))).address
        return address
    url: str = closing(_http_fleet(_registered(), pull)).url
    return url


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_frame_claim_over_the_default_bound_is_refused_before_allocating(
    closing: Callable[[Any], Any], transport: str
) -> None:
    """A frame that announces a message larger than the node's default bound (half of the
    machine's memory: max_model_bytes unset) makes start_client raise DecodeError naming
    the bound, at once, with nothing allocated. (Before: any claim up to the whole
    physical memory was allocated, from a 40-byte message.)"""
    claim = _claim(default_max_model_bytes(LIMIT) + 1)
    address = _serving(closing, transport, claim)
    bound = default_max_model_bytes(LIMIT)
    _raises_within(_node(address, transport), DecodeError, f"over the {bound} bytes expected")


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_frame_claim_over_max_model_bytes_is_refused(
    closing: Callable[[Any], Any], transport: str
) -> None:
    """With start_client(max_model_bytes=1 MiB), a frame announcing 64 MiB (far below the
    machine's memory, 1024 times grpc_max_message_length) is refused with DecodeError
    before the node allocates anything."""
    address = _serving(closing, transport, _claim(64 << 20))
    node = _node(address, transport, max_model_bytes=1 << 20)
    _raises_within(node, DecodeError, f"over the {1 << 20} bytes expected")


def _held_poll_fleet(closing: Callable[[Any], Any], transport: str) -> str:
    """A Fleet server that announces a one-hour poll_timeout and holds every pull."""
    create = _registered(poll_timeout=3600.0)
    if transport == "grpc-rere":
        fake: Any = None

        def hold(_request: bytes) -> bytes:
            fake.stop.wait(WAIT)
            return b""

        behaviours = _fleet(create, b"")
        behaviours[Verb.PULL] = hold
        fake = closing(FakeGrpcServer(fleet=behaviours))
        address: str = fake.address
        return address
    server = FakeHttpServer(
        {
            Verb.CREATE_NODE: _answer(create),
            Verb.PULL: _silent,
            Verb.HEARTBEAT: _answer(b""),
            Verb.DELETE_NODE: _answer(b""),
        }
    )
    url: str = closing(server).url
    return url


@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_a_server_poll_timeout_is_clamped_to_the_node_maximum(
    closing: Callable[[Any], Any],
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that announces poll_timeout=3600 and holds each pull cannot keep the
    node waiting an hour: the node clamps the poll to its maximum
    (fleet_client.MAX_POLL_TIMEOUT, 300 s; lowered to 0.5 s here, with the 15 s slack to
    0.5 s, to keep the test short), gives the pull up at that deadline, and with
    max_retries=0 start_client raises ConnectError. (Before: 3615 s per pull.)
    grpc-bidi has no poll: a silent stream is the server having no work
    (test_silent_bidi_server_holds_the_node_until_it_goes_away)."""
    monkeypatch.setattr(fleet_client, "MAX_POLL_TIMEOUT", 0.5)
    monkeypatch.setattr(fleet_client, "_SLACK", 0.5)
    caplog.set_level(logging.WARNING, logger="stamen.client")
    address = _held_poll_fleet(closing, transport)
    _raises_within(_node(address, transport), ConnectError, "gave up")
    assert "poll_timeout of 3600 s is over the node's maximum" in caplog.text


class _AnnouncingBidiServer:
    """A grpc-bidi server that announces ``stamen-frames: <value>`` in its initial
    metadata, then sends a FitIns and waits."""

    def __init__(self, value: str) -> None:
        self.stop = threading.Event()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))

        def join(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            context.send_initial_metadata(((FRAMES_METADATA, value),))
            yield _FIT
            self.stop.wait(WAIT)

        handler = grpc.stream_stream_rpc_method_handler(join)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(BIDI_SERVICE_NAME, {BIDI_METHOD_NAME: handler}),)
        )
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def close(self) -> None:
        self.stop.set()
        self._server.stop(grace=None).wait(WAIT)


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_a_tiny_server_message_bound_is_refused(
    closing: Callable[[Any], Any], transport: str
) -> None:
    """A server announcing a message bound of 300 bytes (a node frames its replies to the
    server's bound: a model would go a byte per frame, the node sending for ever) makes
    start_client raise ProtocolError naming the bound."""
    if transport == "grpc-bidi":
        address = closing(_AnnouncingBidiServer("300")).address
    else:
        create = fc.encode_create_node_response(CreateNodeResponse(77, 1.0, 1.0, 300))
        pull = fc.encode_pull_response(PullResponse(1, _FIT))
        if transport == "grpc-rere":
            address = closing(FakeGrpcServer(fleet=_fleet(create, pull))).address
        else:
            address = closing(_http_fleet(create, pull)).url
    _raises_within(_node(address, transport), ProtocolError, "at least 1024")


@pytest.mark.parametrize("value", ["9" * 5000, "-5", "lots"], ids=["5000-digits", "sign", "word"])
def test_a_malformed_bidi_frames_announcement_is_ignored(
    closing: Callable[[Any], Any], value: str
) -> None:
    """A grpc-bidi server whose stamen-frames value is not a plain byte count (5000 digits,
    a sign, a word) is taken as announcing no bound: the node trains and replies (before:
    int() raised a raw ValueError on 5000 digits, over Python's limit for int())."""
    server = closing(_AnnouncingBidiServer(value))
    node = _node(server.address, "grpc-bidi")
    time.sleep(0.5)
    assert not node.done.is_set(), node.join(0)
    server.close()
    _raises_within(node, ConnectError, "gave up")


def test_a_bidi_server_without_node_authentication_is_refused_by_a_node_with_keys(
    closing: Callable[[Any], Any],
) -> None:
    """A node with authentication_keys facing a grpc-bidi server that announces neither
    frames nor a session key (a Flower server: Flower 1.12 has no node authentication on
    grpc-bidi) raises AuthError instead of training unauthenticated, like rest against a
    Flower SuperLink."""

    def join(requests: Iterator[bytes], stop: Any) -> Iterator[bytes]:
        yield _FIT
        stop.wait(WAIT)

    address = closing(FakeGrpcServer(join=join)).address
    node = _node(address, "grpc-bidi", authentication_keys=generate_node_keys())
    _raises_within(node, AuthError, "does not take part in node authentication")
