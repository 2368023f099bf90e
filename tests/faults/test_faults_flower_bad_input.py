"""Bad input on Flower 1.12's Fleet API endpoints: an error status, never a crash or a hang.

One server (module scope, message limit 64 KiB) serves Flower's Fleet API on its gRPC
port (``flwr.proto.Fleet``) and its REST port (``/api/v0/fleet/*``) beside Stamen's own
protocols. Hypothesis-generated garbage goes to every call over both: random bytes,
truncated and corrupted valid requests, valid requests of the wrong call, requests naming
unknown nodes; bodies over the limit get RESOURCE_EXHAUSTED / 413. Each request gets
exactly the status an oracle computes from the bytes (the decoders the server uses), and
the server keeps serving: honest Stamen nodes train 3 rounds of FedAvg on that server while
a thread keeps sending garbage to the Flower endpoints, and the model is exactly that of
the same run without garbage. Examples are fixed (derandomized), so CI runs the same ones.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import grpc
import httpx
import numpy as np
import pytest
from fault_tools import FUZZ_TIMING, WAIT, FaultFedAvg, expected_parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamen.errors import DecodeError, FleetError
from stamen.messages import Code, FitRes, Parameters, Status
from stamen.ndarrays import parameters_to_ndarrays
from stamen.protocol.fleet import ERRORS, ErrorKind
from stamen.protocol.flower_fleet import (
    TRAIN,
    CreateNodeRequest,
    DeleteNodeRequest,
    GetFabRequest,
    GetRunRequest,
    Node,
    PingRequest,
    PullTaskInsRequest,
    PushTaskResRequest,
    TaskMeta,
    TaskRes,
)
from stamen.protocol.record_limits import RecordLimits, check_push_task_res
from stamen.server import ServerConfig
from stamen.server.app import run_server
from stamen.testing import NodeThread, RunningServer, node_threads, running_server
from stamen.testing.conformance import AddClient
from stamen.wire import FLOWER_REST_CONTENT_TYPE, FlowerCall
from stamen.wire import flower_codec as codec

MAX = 64 * 1024
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

node_ids = st.integers(0, 2**64 - 1)
nodes = st.builds(Node, node_ids, st.booleans())
intervals = st.floats(0, 1e6)
_META = TaskMeta("", 1, TRAIN, producer=Node(3), ancestry=("x",))
_FIT_RES = FitRes(Status(Code.OK, ""), Parameters([b"ab"], "custom"), 2, {"k": 1})

flower_requests: st.SearchStrategy[bytes] = st.one_of(
    intervals.map(lambda i: codec.encode_create_node_request(CreateNodeRequest(i))),
    nodes.map(lambda n: codec.encode_delete_node_request(DeleteNodeRequest(n))),
    st.builds(PingRequest, nodes, intervals).map(codec.encode_ping_request),
    nodes.map(lambda n: codec.encode_pull_task_ins_request(PullTaskInsRequest(n))),
    nodes.map(
        lambda n: codec.encode_push_task_res_request(
            PushTaskResRequest(n, (TaskRes(_META, reply=_FIT_RES),))
        )
    ),
    st.builds(GetRunRequest, nodes, node_ids).map(codec.encode_get_run_request),
    st.builds(GetFabRequest, nodes, st.text(max_size=20)).map(codec.encode_get_fab_request),
)
"""Valid requests of every call, naming random (never registered) nodes."""


@st.composite
def _damaged(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    data = draw(valid)
    if not data:
        return data
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    index = draw(st.integers(0, len(data) - 1))
    return data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1 :]


garbage = st.one_of(st.binary(max_size=300), flower_requests, _damaged(flower_requests))

_DECODERS: dict[FlowerCall, Callable[[bytes], object]] = {
    FlowerCall.CREATE_NODE: codec.decode_create_node_request,
    FlowerCall.DELETE_NODE: codec.decode_delete_node_request,
    FlowerCall.PING: codec.decode_ping_request,
    FlowerCall.PULL_TASK_INS: codec.decode_pull_task_ins_request,
    FlowerCall.PUSH_TASK_RES: codec.decode_push_task_res_request,
    FlowerCall.GET_RUN: codec.decode_get_run_request,
    FlowerCall.GET_FAB: codec.decode_get_fab_request,
}


def expected_error(call: FlowerCall, body: bytes) -> ErrorKind | None:
    """What the server must answer ``body`` on ``call`` with (None: success).

    No garbage names a registered node (random 64-bit ids): CreateNode registers one (the
    tests delete it at once), DeleteNode and Ping of an unknown node succeed (Ping says
    ``success=False``), every other call of an unknown node is NOT_FOUND.
    """
    if len(body) > MAX:
        return ErrorKind.TOO_LARGE
    try:
        if call is FlowerCall.PUSH_TASK_RES:  # counted first (the node is unknown: defaults)
            check_push_task_res(body, RecordLimits())
        _DECODERS[call](body)
    except (DecodeError, FleetError):
        return ErrorKind.INVALID_ARGUMENT
    if call in (FlowerCall.CREATE_NODE, FlowerCall.DELETE_NODE, FlowerCall.PING):
        return None
    return ErrorKind.UNKNOWN_NODE


@pytest.fixture(scope="module")
def garbage_server() -> Iterator[RunningServer]:
    with running_server(
        run=False, rest=True, grpc_max_message_length=MAX, timing=FUZZ_TIMING
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def raw_channel(garbage_server: RunningServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(garbage_server.address, options=options)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def http(garbage_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=garbage_server.rest_url, timeout=WAIT) as client:
        yield client


def grpc_call(channel: grpc.Channel, call: FlowerCall, body: bytes) -> tuple[str, bytes]:
    """``(status name, response)`` of one raw unary call."""
    try:
        response: bytes = channel.unary_unary(call.grpc_method)(body, timeout=WAIT)
    except grpc.RpcError as exc:
        return exc.code().name, b""
    return "OK", response


def rest_call(http: httpx.Client, call: FlowerCall, body: bytes) -> tuple[int, bytes]:
    """``(HTTP status, response)`` of one raw POST."""
    headers = {"content-type": FLOWER_REST_CONTENT_TYPE}
    response = http.post(call.rest_path, content=body, headers=headers)
    return response.status_code, response.content


def _forget(channel: grpc.Channel, call: FlowerCall, response: bytes) -> None:
    """Delete the node a successful CreateNode registered."""
    if call is FlowerCall.CREATE_NODE:
        node = codec.decode_create_node_response(response).node
        leave = codec.encode_delete_node_request(DeleteNodeRequest(node))
        assert grpc_call(channel, FlowerCall.DELETE_NODE, leave)[0] == "OK"


def assert_serving(channel: grpc.Channel, http: httpx.Client) -> None:
    """A Flower node registers, asks for its run's FAB (NOT_FOUND) and leaves, on both ports."""
    register = codec.encode_create_node_request(CreateNodeRequest(30.0))
    status, created = grpc_call(channel, FlowerCall.CREATE_NODE, register)
    assert status == "OK"
    node = codec.decode_create_node_response(created).node
    fab = codec.encode_get_fab_request(GetFabRequest(node, "h"))
    assert grpc_call(channel, FlowerCall.GET_FAB, fab)[0] == "NOT_FOUND"
    leave = codec.encode_delete_node_request(DeleteNodeRequest(node))
    assert grpc_call(channel, FlowerCall.DELETE_NODE, leave)[0] == "OK"
    code, created = rest_call(http, FlowerCall.CREATE_NODE, register)
    assert code == 200
    node = codec.decode_create_node_response(created).node
    leave = codec.encode_delete_node_request(DeleteNodeRequest(node))
    assert rest_call(http, FlowerCall.DELETE_NODE, leave)[0] == 200


@pytest.mark.parametrize("call", list(FlowerCall), ids=lambda c: c.name)
@FUZZ
@given(body=garbage)
def test_flower_grpc_answers_garbage_with_the_right_status(
    raw_channel: grpc.Channel, call: FlowerCall, body: bytes
) -> None:
    """Every call of ``flwr.proto.Fleet`` answers garbage with exactly the status of its
    error kind (INVALID_ARGUMENT for bytes that are not its request, NOT_FOUND for an
    unknown node), and valid requests with OK."""
    kind = expected_error(call, body)
    status, response = grpc_call(raw_channel, call, body)
    assert status == ("OK" if kind is None else ERRORS[kind].grpc_status), (kind, body[:60])
    if status == "OK":
        _forget(raw_channel, call, response)


@pytest.mark.parametrize("call", list(FlowerCall), ids=lambda c: c.name)
@FUZZ
@given(body=garbage)
def test_flower_rest_answers_garbage_with_the_right_status(
    raw_channel: grpc.Channel, http: httpx.Client, call: FlowerCall, body: bytes
) -> None:
    """Every Flower REST route answers garbage with exactly the HTTP status of its error
    kind (400, 404) and a text/plain reason, and valid requests with 200 and a protobuf."""
    kind = expected_error(call, body)
    code, response = rest_call(http, call, body)
    assert code == (200 if kind is None else ERRORS[kind].http_status), (kind, body[:60])
    if code == 200:
        _forget(raw_channel, call, response)


@pytest.mark.parametrize("call", list(FlowerCall), ids=lambda c: c.name)
def test_flower_requests_over_the_limit_are_refused(
    raw_channel: grpc.Channel, http: httpx.Client, call: FlowerCall
) -> None:
    """A Flower request over the server's message bound is RESOURCE_EXHAUSTED on gRPC and
    413 on REST, with a reason; the server serves on."""
    body = b"\x0a" * (MAX + 1)
    assert grpc_call(raw_channel, call, body)[0] == "RESOURCE_EXHAUSTED"
    code, reason = rest_call(http, call, body)
    assert code == 413 and b"limit" in reason
    assert_serving(raw_channel, http)


def _many_metrics(entries: int) -> bytes:
    """A PushTaskResRequest of node 7 (unknown) whose metrics record holds ``entries``
    empty entries (2 bytes each on the wire, an object each once decoded)."""

    def field(number: int, payload: bytes) -> bytes:
        size, length = len(payload), bytearray()
        while size >= 0x80:
            length.append(size & 0x7F | 0x80)
            size >>= 7
        return bytes([number << 3 | 2, *length, size]) + payload

    record = field(1, b"") * entries  # MetricsRecord.data
    recordset = field(2, field(1, b"m") + field(2, record))  # RecordSet.metrics
    task_res = field(4, field(9, recordset))  # TaskRes.task.recordset
    return field(1, b"\x08\x07") + field(2, task_res)


def test_flower_task_res_with_too_many_entries_is_refused_before_decoding(
    raw_channel: grpc.Channel, http: httpx.Client
) -> None:
    """A TaskRes whose metrics hold 10,001 entries (20 KB) is refused, INVALID_ARGUMENT on
    gRPC and 400 on REST, with a reason naming the limit; 10,000 pass the count (and the
    unknown node is NOT_FOUND); the server serves on."""
    over, within = _many_metrics(10_001), _many_metrics(10_000)
    assert grpc_call(raw_channel, FlowerCall.PUSH_TASK_RES, within)[0] == "NOT_FOUND"
    with pytest.raises(grpc.RpcError) as refused:
        raw_channel.unary_unary(FlowerCall.PUSH_TASK_RES.grpc_method)(over, timeout=WAIT)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "RecordLimits.max_entries" in refused.value.details()
    code, reason = rest_call(http, FlowerCall.PUSH_TASK_RES, over)
    assert code == 400 and b"more than 10000 metrics and configs entries" in reason
    assert rest_call(http, FlowerCall.PUSH_TASK_RES, within)[0] == 404
    assert_serving(raw_channel, http)


def test_flower_rest_takes_flowers_doubled_slash_and_refuses_other_content_types(
    garbage_server: RunningServer, http: httpx.Client
) -> None:
    """Flower 1.12's REST node posts GetRun and GetFab to ``//api/v0/fleet/...``: served;
    a body that is not ``application/protobuf`` gets 415."""
    body = codec.encode_get_run_request(GetRunRequest(Node(12345), 1))
    response = httpx.post(
        f"{garbage_server.rest_url}/{FlowerCall.GET_RUN.rest_path}",  # the doubled slash
        content=body,
        headers={"content-type": FLOWER_REST_CONTENT_TYPE},
        timeout=WAIT,
    )
    assert response.status_code == 404 and b"not registered" in response.content
    response = http.post(
        FlowerCall.PING.rest_path, content=b"", headers={"content-type": "application/json"}
    )
    assert response.status_code == 415


# --- an honest run through the garbage -------------------------------------------------------


class GarbageHose:
    """A thread that sends garbage to every Flower call, over gRPC and REST, until stopped
    (only garbage that cannot register a node: a silent one would be picked for a round)."""

    def __init__(self, channel: grpc.Channel, http: httpx.Client) -> None:
        self._channel = channel
        self._http = http
        self._stop = threading.Event()
        self.sent = 0
        self.wrong: list[tuple[FlowerCall, bytes, object]] = []
        self._thread = threading.Thread(target=self._run, name="flower-garbage", daemon=True)

    def _body(self, rng: random.Random) -> bytes:
        choice = rng.randrange(4)
        if choice == 0:
            return rng.randbytes(rng.randrange(200))
        if choice == 1:
            node = Node(rng.getrandbits(62))
            valid = codec.encode_push_task_res_request(
                PushTaskResRequest(node, (TaskRes(_META, reply=_FIT_RES),))
            )
            return valid[: rng.randrange(len(valid) + 1)]
        if choice == 2:
            return codec.encode_pull_task_ins_request(PullTaskInsRequest(Node(rng.getrandbits(62))))
        return b"\x0a" * (MAX + 1) if rng.random() < 0.1 else b"\xff"

    def _run(self) -> None:
        rng = random.Random(14)
        while not self._stop.is_set():
            call = rng.choice(list(FlowerCall))
            body = self._body(rng)
            kind = expected_error(call, body)
            if kind is None:
                continue
            if rng.random() < 0.5:
                got: object = grpc_call(self._channel, call, body)[0]
                ok = got == ERRORS[kind].grpc_status
            else:
                got = rest_call(self._http, call, body)[0]
                ok = got == ERRORS[kind].http_status
            self.sent += 1
            if not ok:
                self.wrong.append((call, body[:60], got))

    def __enter__(self) -> GarbageHose:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)


def test_stamen_nodes_train_exactly_while_flower_endpoints_get_garbage(
    garbage_server: RunningServer, raw_channel: grpc.Channel, http: httpx.Client
) -> None:
    """On the server that took the garbage above, three Stamen nodes (grpc-rere, rest,
    grpc-bidi) run 3 rounds of FedAvg while a thread keeps sending garbage to every Flower
    call on both ports: every garbage request gets its error, and the final model is
    exactly the one the nodes' updates make."""
    strategy = FaultFedAvg(
        start_with=3, min_fit_clients=3, min_evaluate_clients=3, min_available_clients=3
    )
    garbage_server.server.set_strategy(strategy)
    assert_serving(raw_channel, http)
    with GarbageHose(raw_channel, http) as hose, node_threads() as threads:
        for k, transport in zip((1, 2, 3), ("grpc-rere", "rest", "grpc-bidi"), strict=True):
            kwargs = {
                "server_address": garbage_server.address_for(transport),
                "transport": transport,
                "client": AddClient(k).to_client(),
            }
            threads.append(NodeThread(kwargs).start())
        run_server(garbage_server.server, ServerConfig(num_rounds=3))
        outcomes = [thread.join(WAIT) for thread in threads]
    assert outcomes == [None] * 3
    assert not hose.wrong, hose.wrong[:5]
    assert hose.sent > 20, hose.sent
    got = parameters_to_ndarrays(garbage_server.server.parameters)
    for a, b in zip(got, expected_parameters([[1, 2, 3]] * 3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
