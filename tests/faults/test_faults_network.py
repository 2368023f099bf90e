"""Network faults: a TCP proxy between nodes and the server cuts or stalls the traffic.

:class:`fault_tools.FaultProxy` resets every connection and refuses new ones (a cut), or
keeps connections open but holds every byte (a stall) until it is healed. Faults are
injected from the strategy's ``before_fit`` hook (between rounds) or while a node is held
inside its fit, so each test is deterministic; every wait is bounded.
"""

from __future__ import annotations

import gc
import select
import socket
import statistics
import struct
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from fault_tools import (
    WAIT,
    FaultFedAvg,
    FaultProxy,
    HoldingClient,
    WatchedClientManager,
    expected_parameters,
    fault_proxy,
)

from stamen.client.app import NodeConfig, make_node_config, run_node
from stamen.client.numpy_client import NumPyClient
from stamen.clock import SystemClock
from stamen.errors import ConnectionLost
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.net import tls as _tls
from stamen.protocol.fleet import CreateNodeRequest, SimpleRequest
from stamen.server import ServerConfig
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import NodeThread, RunningServer, node_threads, running_server
from stamen.testing.conformance import TRANSPORTS, AddClient
from stamen.transport.base import ClientTransport, TransportSettings
from stamen.transport.fleet import FleetClientTransport, Requester
from stamen.transport.grpc_rere import GrpcRereRequester
from stamen.transport.rest import RestRequester
from stamen.typing import Config, NDArrays, Scalar
from stamen.wire import Verb
from stamen.wire import fleet_codec as fc

# A node silent for 1 s is dropped; an idle long-poll lasts 1 s.
TIMING = FleetTiming(heartbeat_interval=0.2, heartbeat_timeout=1.0, poll_timeout=1.0)


def _through(proxy: FaultProxy, transport: str) -> str:
    return proxy.url if transport == "rest" else proxy.address


def _target(srv: RunningServer, transport: str) -> tuple[str, int]:
    port = srv.rest_port if transport == "rest" else srv.port
    assert port is not None
    return srv.host, port


def _node(address: str, transport: str, client: AddClient) -> NodeThread:
    kwargs = {"server_address": address, "transport": transport, "client": client.to_client()}
    return NodeThread(kwargs).start()


def _assert_params(srv: RunningServer, rounds: list[list[int]]) -> None:
    got = parameters_to_ndarrays(srv.server.parameters)
    for a, b in zip(got, expected_parameters(rounds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.fixture
def manager() -> WatchedClientManager:
    """A client manager whose node count the test can wait on."""
    return WatchedClientManager()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cut_between_rounds_nodes_reconnect_and_the_run_is_exact(
    manager: WatchedClientManager, transport: str
) -> None:
    """All 3 nodes reach the server through the proxy. Before round 2 the proxy resets
    every connection and refuses new ones until the server has forgotten every node
    (grpc-bidi at once, grpc-rere/rest at the heartbeat timeout); then it heals. Every
    node reconnects on its own (a new registration), rounds 2 and 3 run with all three,
    the model is exactly that of an undisturbed run, and every node exits normally."""
    cut_seen: list[set[str]] = []

    def cut_before_round_2(server_round: int) -> None:
        if server_round != 2:
            return
        before = set(manager.all())
        proxy.cut()
        manager.wait_count(lambda n: n == 0, WAIT, "the server forgets the cut nodes")
        accepted = proxy.accepted
        proxy.heal()
        manager.wait_count(lambda n: n == 3, WAIT, "the nodes reconnect")
        assert proxy.accepted > accepted, "the nodes came back through the proxy"
        cut_seen.append(before & set(manager.all()))

    strategy = FaultFedAvg(
        start_with=3,
        before_fit=cut_before_round_2,
        min_fit_clients=3,
        min_evaluate_clients=3,
        min_available_clients=3,
    )
    config = ServerConfig(num_rounds=3)
    with (
        running_server(
            config=config, strategy=strategy, client_manager=manager, rest=True, timing=TIMING
        ) as srv,
        fault_proxy(_target(srv, transport)) as proxy,
        node_threads() as nodes,
    ):
        for k in (1, 2, 3):
            nodes.append(_node(_through(proxy, transport), transport, AddClient(k)))
        srv.result(WAIT * 2)
        outcomes = [node.join(WAIT) for node in nodes]
    assert cut_seen == [set()], "the nodes after the cut are new registrations"
    assert [strategy.ks(r) for r in (1, 2, 3)] == [[1, 2, 3]] * 3
    _assert_params(srv, [[1, 2, 3]] * 3)
    assert outcomes == [None] * 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cut_during_a_fit_fails_that_instruction_and_the_node_comes_back(
    manager: WatchedClientManager, transport: str
) -> None:
    """One node reaches the server through the proxy, two directly. The proxy cuts while
    that node is inside its first fit: the server fails its instruction with
    ConnectionLost (grpc-bidi at once, grpc-rere/rest at the heartbeat timeout) and round
    1 completes with the other two. Healed, the node finishes its fit (the reply is for a
    node the server has forgotten and changes nothing), reconnects, and serves round 2."""
    victim = HoldingClient(3)
    strategy = FaultFedAvg(
        start_with=3, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=3
    )
    with (
        running_server(
            config=ServerConfig(num_rounds=2),
            strategy=strategy,
            client_manager=manager,
            rest=True,
            timing=TIMING,
        ) as srv,
        fault_proxy(_target(srv, transport)) as proxy,
        node_threads() as nodes,
    ):
        try:
            for k in (1, 2):
                nodes.append(_node(srv.address_for(transport), transport, AddClient(k)))
            nodes.append(_node(_through(proxy, transport), transport, victim))
            assert victim.entered.wait(WAIT)
            proxy.cut()
            strategy.wait_round(1)
            proxy.heal()
        finally:
            victim.release.set()
        srv.result(WAIT)
        outcomes = [node.join(WAIT) for node in nodes]
    assert strategy.ks(1) == [1, 2]
    (failure,) = strategy.failures(1)
    assert isinstance(failure, ConnectionLost), failure
    assert strategy.ks(2) == [1, 2, 3] and not strategy.failures(2)
    _assert_params(srv, [[1, 2], [1, 2, 3]])
    assert outcomes == [None] * 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stall_fails_the_instruction_and_the_node_recovers(
    manager: WatchedClientManager, transport: str
) -> None:
    """One node reaches the server through the proxy, two directly. While that node is
    inside its first fit the proxy stalls: connections stay open but no byte moves. Its
    heartbeats and its reply are held, so the heartbeat timeout (1 s, before round_timeout)
    fails the instruction with ConnectionLost — grpc-rere and rest by dropping the node,
    grpc-bidi by closing its stream — and round 1 completes with the other two. Healed, the held
    bytes arrive late and change nothing (a late reply is discarded; a forgotten node is
    told to register again), and the node serves round 2."""
    victim = HoldingClient(3)
    strategy = FaultFedAvg(
        start_with=3, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=3
    )
    config = ServerConfig(num_rounds=2, round_timeout=3.0)
    with (
        running_server(
            config=config, strategy=strategy, client_manager=manager, rest=True, timing=TIMING
        ) as srv,
        fault_proxy(_target(srv, transport)) as proxy,
        node_threads() as nodes,
    ):
        try:
            for k in (1, 2):
                nodes.append(_node(srv.address_for(transport), transport, AddClient(k)))
            nodes.append(_node(_through(proxy, transport), transport, victim))
            assert victim.entered.wait(WAIT)
            proxy.stall()
            victim.release.set()  # its reply (and heartbeats) are now held by the proxy
            strategy.wait_round(1)
        finally:
            proxy.heal()
            victim.release.set()
        srv.result(WAIT)
        outcomes = [node.join(WAIT) for node in nodes]
    assert strategy.ks(1) == [1, 2]
    (failure,) = strategy.failures(1)
    if transport == "grpc-bidi":
        assert isinstance(failure, ConnectionLost), failure
        assert "no reply or heartbeat" in str(failure), failure
    else:
        assert isinstance(failure, ConnectionLost) and "no heartbeat" in str(failure), failure
    assert strategy.ks(2) == [1, 2, 3] and not strategy.failures(2)
    _assert_params(srv, [[1, 2], [1, 2, 3]])
    assert outcomes == [None] * 3


def test_rest_exchanges_are_not_held_back_by_delayed_acks() -> None:
    """A rest node's request/response exchange takes a few milliseconds on 127.0.0.1.
    Before the fix the REST listener's socket said proto 0, so asyncio did not set
    TCP_NODELAY on its connections: every response with a body (headers, then body: two
    writes) waited for the node's delayed ACK, ~40 ms per request."""
    register = fc.encode_create_node_request(CreateNodeRequest())
    with running_server(run=False, rest=True) as srv:
        requester = RestRequester(TransportSettings(srv.rest_url, max_message_length=1 << 20))
        requester.open()
        try:
            took = []
            for _ in range(11):
                started = time.monotonic()
                created = requester.call(Verb.CREATE_NODE, register, WAIT)
                took.append(time.monotonic() - started)
                node_id = fc.decode_create_node_response(created).node_id
                leave = fc.encode_simple_request(SimpleRequest(node_id))
                requester.call(Verb.DELETE_NODE, leave, WAIT)
        finally:
            requester.close()
    assert statistics.median(took[1:]) < 0.02, took  # ~0.044 s before the fix


def _reset_connection(fin_first: bool) -> tuple[socket.socket, socket.socket]:
    """A client socket whose peer has reset it (the RST has arrived), and the listener."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=WAIT)
    accepted, _ = listener.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if fin_first:
        accepted.shutdown(socket.SHUT_RDWR)
    accepted.close()
    readable, _, _ = select.select([client], [], [], WAIT)
    assert readable, "the reset did not arrive"
    return client, listener


@pytest.mark.parametrize("fin_first", [True, False], ids=["fin-rst", "rst"])
@pytest.mark.parametrize("secure", [False, True], ids=["plaintext-node", "tls-node"])
def test_a_reset_connection_is_not_diagnosed_as_a_tls_problem(
    secure: bool, fin_first: bool
) -> None:
    """When a connection fails, the node probes the server's TLS over a connection of its
    own. A server (or a network) that resets that connection says nothing about TLS: the
    probe must not conclude "the server speaks TLS" (or "requires a client certificate"),
    an error that is final and stops the node for good, and it must not leak a socket.
    Before the fix, after FIN+RST, Python's ssl skipped the handshake without an error and
    the probe took that for a TLS server; after a bare RST ssl raised and leaked the socket
    it had made (a ResourceWarning, an error under this suite's filterwarnings)."""
    client, listener = _reset_connection(fin_first)
    try:
        if secure:
            found = _tls._probe_secure(client, "127.0.0.1", "127.0.0.1:1", None, None)
        else:
            found = _tls._probe_plaintext(client, "127.0.0.1:1")
    finally:
        client.close()
        listener.close()
    assert found is None, found


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext-node", "tls-node"])
def test_a_reset_during_the_handshake_is_not_a_tls_problem_and_leaks_nothing(
    secure: bool,
) -> None:
    """The peer reads the ClientHello, then resets. The probe drives TLS over its own
    socket through memory BIOs, so no SSLSocket exists that could be left unclosed (a
    ResourceWarning surfacing later, in whatever test the garbage collector interrupts)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=WAIT)
    accepted, _ = listener.accept()
    try:
        client.settimeout(WAIT)
        hello: list[bytes] = []

        def reset_after_hello() -> None:
            accepted.settimeout(WAIT)
            hello.append(accepted.recv(65536))
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            accepted.close()

        peer = threading.Thread(target=reset_after_hello, daemon=True)
        peer.start()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            if secure:
                found = _tls._probe_secure(client, "127.0.0.1", "127.0.0.1:1", None, None)
            else:
                found = _tls._probe_plaintext(client, "127.0.0.1:1")
            gc.collect()
        peer.join(WAIT)
        assert not peer.is_alive()
    finally:
        client.close()
        listener.close()
    assert hello and hello[0][:1] == b"\x16", hello  # a TLS handshake record was sent
    assert found is None, found


class _DroppingPushes:
    """A node's requester whose pushes fail as a dropped connection, ``count`` of them
    from the ``first``-th on: before reaching the server, or after it (the server has the
    push, its answer is lost). Pushes may be made from several threads at once."""

    def __init__(self, inner: Requester, *, count: int, delivered: bool, first: int = 1) -> None:
        self.inner = inner
        self.left = count
        self.delivered = delivered
        self.first = first
        self.pushes = 0
        self._lock = threading.Lock()

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        if verb is Verb.PUSH:
            with self._lock:
                self.pushes += 1
                drop = self.pushes >= self.first and self.left > 0
                self.left -= drop
            if drop:
                if self.delivered:
                    self.inner.call(verb, body, timeout)
                raise ConnectionLost("connection reset by peer (injected)")
        return self.inner.call(verb, body, timeout)


def _node_over(
    srv: RunningServer,
    transport: str,
    client: NumPyClient,
    grpc_max_message_length: int,
    factory: Callable[[NodeConfig], ClientTransport],
) -> tuple[threading.Thread, list[BaseException | None]]:
    """A node on a thread of its own, on the transports ``factory`` makes, that must not
    need to reconnect; the list gets None when it ends cleanly, else its error."""
    config = make_node_config(
        server_address=srv.address_for(transport),
        client_fn=None,
        client=client.to_client(),
        grpc_max_message_length=grpc_max_message_length,
        root_certificates=None,
        insecure=True,
        transport=transport,
        authentication_keys=None,
        max_retries=0,
        max_wait_time=None,
    )
    outcome: list[BaseException | None] = []

    def node() -> None:
        try:
            run_node(config, clock=SystemClock(), rng=lambda: 0.5, transport_factory=factory)
            outcome.append(None)
        except BaseException as exc:  # reported by the test
            outcome.append(exc)

    thread = threading.Thread(target=node, name="flaky-node", daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("delivered", [False, True], ids=["request-lost", "response-lost"])
@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_a_push_whose_connection_drops_is_sent_again_and_no_result_is_lost(
    transport: str, delivered: bool
) -> None:
    """The first two pushes of a node's replies fail as a dropped connection. The node
    sends them again (pushes are idempotent) instead of registering anew and losing the
    reply: every round aggregates both nodes, with no failure, and the model is exact."""
    strategy = FaultFedAvg(
        start_with=2, min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2
    )
    requesters: list[_DroppingPushes] = []

    def factory(config: NodeConfig) -> ClientTransport:
        settings = config.settings
        inner = GrpcRereRequester(settings) if transport == "grpc-rere" else RestRequester(settings)
        requester = _DroppingPushes(inner, count=2, delivered=delivered)
        requesters.append(requester)
        return FleetClientTransport(requester, max_message_length=settings.max_message_length)

    with (
        running_server(config=ServerConfig(num_rounds=2), strategy=strategy, rest=True) as srv,
        node_threads() as nodes,
    ):
        flaky, outcome = _node_over(srv, transport, AddClient(1), 1 << 20, factory)
        nodes.append(_node(srv.address_for(transport), transport, AddClient(2)))
        srv.result(WAIT)
        flaky.join(WAIT)
        assert not flaky.is_alive()
    assert outcome == [None]
    assert len(requesters) == 1, "the node registered again"
    assert requesters[0].left == 0 and requesters[0].pushes >= 4
    assert [strategy.ks(r) for r in (1, 2)] == [[1, 2]] * 2
    assert strategy.failures(1) == [] and strategy.failures(2) == []
    _assert_params(srv, [[1, 2]] * 2)


class _AddToLarge(NumPyClient):
    """Adds ``k`` to a model of one array; its reply goes in many frames on a small link."""

    def __init__(self, k: int, size: int) -> None:
        self.k = k
        self.size = size

    def get_parameters(self, config: Config) -> NDArrays:
        return [np.zeros(self.size, dtype=np.float32)]

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return [p + np.float32(self.k) for p in parameters], self.k, {}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, self.k, {}


@pytest.mark.parametrize("delivered", [False, True], ids=["request-lost", "response-lost"])
@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_a_lost_push_of_a_frame_in_flight_is_sent_again_and_the_reply_is_whole(
    transport: str, delivered: bool
) -> None:
    """A large reply's frames go two at a time after the first. The fourth push fails
    once as a dropped connection: it is sent again while the next frame is in flight,
    which the server, having it first, holds until the retried frame is in (or, its
    answer lost, takes as a frame it has). The round aggregates the reply, no failure,
    and the model is exact."""
    size = 20_000  # 80 KB in ~21 frames on a 4 KiB link
    initial = ndarrays_to_parameters([np.zeros(size, dtype=np.float32)])
    strategy = FaultFedAvg(
        start_with=1,
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        initial_parameters=initial,
    )
    requesters: list[_DroppingPushes] = []

    def factory(config: NodeConfig) -> ClientTransport:
        settings = config.settings
        inner = GrpcRereRequester(settings) if transport == "grpc-rere" else RestRequester(settings)
        requester = _DroppingPushes(inner, count=1, delivered=delivered, first=4)
        requesters.append(requester)
        return FleetClientTransport(requester, max_message_length=settings.max_message_length)

    with running_server(config=ServerConfig(num_rounds=1), strategy=strategy, rest=True) as srv:
        thread, outcome = _node_over(srv, transport, _AddToLarge(3, size), 4096, factory)
        srv.result(WAIT)
        thread.join(WAIT)
        assert not thread.is_alive()
        got = parameters_to_ndarrays(srv.server.parameters)
    assert outcome == [None]
    assert len(requesters) == 1 and requesters[0].left == 0, "no push was lost"
    assert requesters[0].pushes > 20
    assert strategy.failures(1) == []
    np.testing.assert_array_equal(got[0], np.full(size, 3.0, dtype=np.float32))
