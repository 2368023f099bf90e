"""The transport conformance suite: one behaviour, every transport.

Each ``check_*`` function runs a real Stamen server on 127.0.0.1 and real client nodes
over the given transport(s) and raises AssertionError when the behaviour differs from the
contract. A transport is given as a :class:`TransportUnderTest` (a factory
``TransportSettings -> ClientTransport`` and the server port its nodes connect to), so a
transport of your own runs the same checks as the built-in ones::

    from stamen.testing import conformance

    mine = conformance.TransportUnderTest(MyTransport, listener="rest")
    conformance.check_fedavg_identical([mine])
    conformance.check_end_of_run(mine)

A name registered with :func:`stamen.transport.register_transport` (``"grpc-bidi"``,
``"grpc-rere"``, ``"rest"``, or yours) works too: its nodes are then started with
``start_client(transport=name)``. ``tests/conformance/`` runs every check on the built-in
transports and on a transport defined in a test (docs/transports.md).
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..client.app import make_node_config, make_transport, run_node
from ..client.client import Client
from ..client.numpy_client import NumPyClient
from ..errors import ConnectError, ConnectionLost, Timeout
from ..messages import Code, FitIns, FitRes, Parameters, ReconnectIns
from ..ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from ..net.limits import GRPC_MAX_MESSAGE_LENGTH
from ..protocol.fleet import CreateNodeRequest, PullRequest
from ..server.client_manager import SimpleClientManager
from ..server.fleet.handler import FleetTiming
from ..server.server import ServerConfig
from ..server.strategy import FedAvg
from ..server.strategy.strategy import FitFailures, FitResults
from ..transport import (
    BUILT_IN_TRANSPORTS,
    TransportFactory,
    transport_factory,
    transport_url_schemes,
)
from ..transport.base import ClientTransport, TransportSettings
from ..transport.fleet import Requester
from ..transport.grpc_rere import GrpcRereRequester
from ..transport.rest import RestRequester
from ..typing import Config, NDArrays, Scalar
from ..wire import Verb, fleet_codec
from .clock import FakeClock
from .nodes import NodeThread, node_threads
from .server import RunningServer, running_server

__all__ = [
    "TRANSPORTS",
    "AddClient",
    "RecordingFedAvg",
    "TransportUnderTest",
    "check_client_exception_is_failure",
    "check_end_of_run",
    "check_fedavg_identical",
    "check_liveness",
    "check_max_retries",
    "check_message_limits",
    "check_reconnect_later",
    "check_round_timeout",
    "check_server_restart",
    "under_test",
]

TRANSPORTS = BUILT_IN_TRANSPORTS
"""The built-in transports' names (each is a valid argument of every check)."""

_WAIT = 30.0


@dataclass(frozen=True)
class TransportUnderTest:
    """A client transport the checks run on.

    Attributes:
        factory: Builds the transport from a node's settings (``settings.address`` is
            ``host:port`` of the server port named by ``listener``).
        listener: The server port its nodes connect to: ``"grpc"`` (grpc-bidi and the
            Fleet protocol over gRPC) or ``"rest"`` (the Fleet protocol over HTTP).
        name: Its name in messages; for a registered transport, the registered name.
        registered: Start its nodes with ``start_client(transport=name)`` (the name is
            registered) instead of with ``factory`` directly.
    """

    factory: TransportFactory
    listener: Literal["grpc", "rest"] = "grpc"
    name: str = "custom"
    registered: bool = False


def under_test(transport: TransportUnderTest | str) -> TransportUnderTest:
    """``transport`` as a :class:`TransportUnderTest`; a registered name's nodes connect
    to the REST port when its addresses may be ``http://`` URLs, else to the gRPC port.

    Raises:
        ConfigError: a name that is not registered.
    """
    if isinstance(transport, TransportUnderTest):
        return transport
    schemes = transport_url_schemes(transport)

    def build(settings: TransportSettings) -> ClientTransport:
        return transport_factory(transport)(settings)

    listener: Literal["grpc", "rest"] = "rest" if "http" in schemes else "grpc"
    return TransportUnderTest(build, listener, transport, registered=True)


class AddClient(NumPyClient):
    """Deterministic client: fit adds ``k`` to every array and reports ``num_examples=k``."""

    def __init__(self, k: int, *, fail_first_fit: bool = False) -> None:
        self.k = k
        self.fail_first_fit = fail_first_fit
        self.fits = 0

    def get_parameters(self, config: Config) -> NDArrays:
        return [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.fits += 1
        if self.fail_first_fit and self.fits == 1:
            raise RuntimeError("disk on fire")
        return [p + np.float32(self.k) for p in parameters], self.k, {"k": self.k}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        return float(parameters[1].sum()), self.k, {"k": self.k}


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps each round's fit results and failures."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[tuple[FitResults, FitFailures]] = []

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.rounds.append((list(results), list(failures)))
        return super().aggregate_fit(server_round, results, failures)


def _strategy(n: int, **kwargs: Any) -> RecordingFedAvg:
    return RecordingFedAvg(
        min_fit_clients=n, min_evaluate_clients=n, min_available_clients=n, **kwargs
    )


def _address(srv: RunningServer, transport: TransportUnderTest) -> str:
    if transport.listener == "grpc":
        return srv.address
    if transport.registered:
        return srv.rest_url
    return f"{srv.host}:{srv.rest_port}"


def _start(
    srv: RunningServer,
    transport: TransportUnderTest | str,
    client: Client,
    nodes: list[NodeThread],
    **kwargs: Any,
) -> NodeThread:
    spec = under_test(transport)
    node = NodeThread(
        {
            "server_address": _address(srv, spec),
            "transport": spec.name,
            "client": client,
            **kwargs,
        },
        transport_factory=None if spec.registered else spec.factory,
    ).start()
    nodes.append(node)
    return node


def _expect_clean_exit(nodes: Sequence[NodeThread]) -> None:
    for node in nodes:
        outcome = node.join(_WAIT)
        assert outcome is None, f"start_client raised {outcome!r}"


def check_fedavg_identical(transports: Sequence[TransportUnderTest | str]) -> NDArrays:
    """3 rounds of FedAvg with 3 nodes (node i on ``transports[i % len]``) give the exact
    weighted mean, and every node's start_client returns normally at the end of the run."""
    strategy = _strategy(3)
    with (
        running_server(config=ServerConfig(num_rounds=3), strategy=strategy, rest=True) as srv,
        node_threads() as nodes,
    ):
        for i, k in enumerate((1, 2, 3)):
            _start(srv, transports[i % len(transports)], AddClient(k).to_client(), nodes)
        history = srv.result(_WAIT)
        _expect_clean_exit(nodes)
    # Each round adds (1*1 + 2*2 + 3*3) / 6 = 7/3 to every parameter: 7 after 3 rounds.
    params = parameters_to_ndarrays(srv.server.parameters)
    np.testing.assert_allclose(params[0], np.full((2, 2), 7.0, np.float32), rtol=1e-6)
    np.testing.assert_allclose(params[1], np.full(3, 7.0, np.float32), rtol=1e-6)
    assert [r for r, _ in history.losses_distributed] == [1, 2, 3]
    assert all(len(results) == 3 and not fails for results, fails in strategy.rounds)
    return params


def check_client_exception_is_failure(transport: TransportUnderTest | str) -> None:
    """An exception in fit is a failure of that round with CLIENT_ERROR naming the error;
    the round aggregates the others and the node serves the next round."""
    strategy = _strategy(2)
    with (
        running_server(config=ServerConfig(num_rounds=2), strategy=strategy, rest=True) as srv,
        node_threads() as nodes,
    ):
        _start(srv, transport, AddClient(1).to_client(), nodes)
        _start(srv, transport, AddClient(5, fail_first_fit=True).to_client(), nodes)
        srv.result(_WAIT)
        _expect_clean_exit(nodes)
    (r1_ok, r1_failed), (r2_ok, r2_failed) = strategy.rounds
    assert len(r1_ok) == 1 and len(r1_failed) == 1, strategy.rounds[0]
    failed = r1_failed[0]
    assert isinstance(failed, tuple) and isinstance(failed[1], FitRes), failed
    assert failed[1].status.code == Code.CLIENT_ERROR
    assert "RuntimeError: disk on fire" in failed[1].status.message
    assert len(r2_ok) == 2 and not r2_failed


def check_round_timeout(transport: TransportUnderTest | str) -> None:
    """round_timeout makes a node that does not answer in time a failure (Timeout) and
    the round completes with the others; the slow node still exits cleanly."""
    release = threading.Event()

    class Slow(AddClient):
        def fit(
            self, parameters: NDArrays, config: Config
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            release.wait(_WAIT)
            return super().fit(parameters, config)

    class Releasing(RecordingFedAvg):
        def aggregate_fit(
            self, server_round: int, results: FitResults, failures: FitFailures
        ) -> tuple[Parameters | None, dict[str, Scalar]]:
            release.set()  # the round is over: let the slow node finish
            return super().aggregate_fit(server_round, results, failures)

    init = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    strategy = Releasing(
        min_fit_clients=2, min_available_clients=2, initial_parameters=init, fraction_evaluate=0.0
    )
    config = ServerConfig(num_rounds=1, round_timeout=0.5)
    with (
        running_server(config=config, strategy=strategy, rest=True) as srv,
        node_threads() as nodes,
    ):
        _start(srv, transport, AddClient(2).to_client(), nodes)
        _start(srv, transport, Slow(100).to_client(), nodes)
        try:
            srv.result(_WAIT)
        finally:
            release.set()
        _expect_clean_exit(nodes)
    [(results, failures)] = strategy.rounds
    assert len(results) == 1 and len(failures) == 1
    assert isinstance(failures[0], Timeout), failures
    np.testing.assert_array_equal(
        parameters_to_ndarrays(srv.server.parameters)[0], np.full(2, 2.0, np.float32)
    )


def _wait_for_node(manager: SimpleClientManager, other_than: str | None = None) -> Any:
    """The one connected node, once it is not ``other_than`` (a node that left may still
    be unregistering when its reply to ReconnectIns has arrived)."""

    def one_new(clients: dict[str, Any]) -> bool:
        return len(clients) == 1 and other_than not in clients

    assert manager.wait_until(one_new, timeout=_WAIT), f"expected one node, have {manager.all()}"
    [proxy] = manager.all().values()
    return proxy


def check_message_limits(transport: TransportUnderTest | str) -> None:
    """grpc_max_message_length bounds every message, and nothing larger is refused: an
    instruction and a reply many times the bound travel in frames and arrive intact, when
    the server's bound is the smaller one and when the node's is."""
    rng = np.random.default_rng(7)
    model: NDArrays = [rng.standard_normal(10_000).astype(np.float32), np.arange(3)]

    class Echo(NumPyClient):
        """Answers the model it received plus 1, scaled up to ``config["repeat"]`` times."""

        def fit(
            self, parameters: NDArrays, config: Config
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            repeat = int(config.get("repeat", 1))
            return [np.tile(a + 1, repeat) for a in parameters], 1, {}

    default = GRPC_MAX_MESSAGE_LENGTH
    for server_limit, node_limit in ((8192, default), (default, 8192)):
        manager = SimpleClientManager(wait_timeout=_WAIT)
        with (
            running_server(
                client_manager=manager, run=False, rest=True, grpc_max_message_length=server_limit
            ) as srv,
            node_threads() as nodes,
        ):
            node = _start(
                srv, transport, Echo().to_client(), nodes, grpc_max_message_length=node_limit
            )
            proxy = _wait_for_node(manager)
            for repeat in (1, 5):
                reply = proxy.fit(FitIns(ndarrays_to_parameters(model), {"repeat": repeat}), _WAIT)
                assert reply.status.code == Code.OK, reply.status
                got = parameters_to_ndarrays(reply.parameters)
                assert len(got) == 2
                for received, sent in zip(got, model, strict=True):
                    assert received.dtype == sent.dtype
                    np.testing.assert_array_equal(received, np.tile(sent + 1, repeat))
            small = proxy.fit(FitIns(ndarrays_to_parameters([np.zeros(4)]), {}), _WAIT)
            assert small.status.code == Code.OK
            proxy.reconnect(ReconnectIns(seconds=0), timeout=_WAIT)
            assert node.join(_WAIT) is None


def check_reconnect_later(transport: TransportUnderTest | str) -> None:
    """ReconnectIns(seconds=1): the node answers RECONNECT, leaves, and rejoins after the
    delay as a new node; ReconnectIns(0) then ends start_client normally."""
    manager = SimpleClientManager(wait_timeout=_WAIT)
    with (
        running_server(client_manager=manager, run=False, rest=True) as srv,
        node_threads() as nodes,
    ):
        node = _start(srv, transport, AddClient(1).to_client(), nodes)
        first = _wait_for_node(manager)
        assert first.reconnect(ReconnectIns(seconds=1), timeout=_WAIT).reason == "RECONNECT"
        second = _wait_for_node(manager, other_than=first.cid)
        assert second.cid != first.cid
        assert second.reconnect(ReconnectIns(seconds=0), timeout=_WAIT).reason == "RECONNECT"
        assert node.join(_WAIT) is None
        assert manager.wait_until(lambda nodes: not nodes, _WAIT)  # the server forgets it


def check_end_of_run(transport: TransportUnderTest | str) -> None:
    """At the end of a run the server tells each node, and start_client returns (Flower's
    grpc-rere and rest nodes never stop on their own); the server forgets the node."""
    init = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    strategy = _strategy(1, initial_parameters=init)
    manager = SimpleClientManager(wait_timeout=_WAIT)
    with (
        running_server(
            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager, rest=True
        ) as srv,
        node_threads() as nodes,
    ):
        _start(srv, transport, AddClient(1).to_client(), nodes)
        srv.result(_WAIT)
        _expect_clean_exit(nodes)
        assert manager.wait_until(lambda nodes: not nodes, _WAIT)  # the server forgets it
        assert len(srv.service.fleet) == 0


@contextmanager
def _dead_address() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def check_max_retries(transport: TransportUnderTest | str) -> None:
    """max_retries=2 against an address where nothing listens: exactly 3 attempts over
    real sockets, waits of full jitter under 1 s then 2 s, then ConnectError."""
    spec = under_test(transport)
    with _dead_address() as address:
        config = make_node_config(
            server_address=address,
            client=AddClient(1).to_client(),
            grpc_max_message_length=1 << 20,
            transport=spec.name,
            max_retries=2,
            transport_factory=None if spec.registered else spec.factory,
        )
        attempts: list[int] = []

        def counting(cfg: Any) -> Any:
            attempts.append(1)
            return make_transport(cfg)

        clock = FakeClock()
        try:
            run_node(config, clock=clock, rng=random.Random(7).random, transport_factory=counting)
            raise AssertionError("run_node returned against a dead address")
        except ConnectError as exc:
            assert "after 3 failed attempt(s)" in str(exc), exc
    assert len(attempts) == 3, attempts
    assert len(clock.sleeps) == 2 and clock.sleeps[0] <= 1.0 and clock.sleeps[1] <= 2.0


def check_server_restart(transport: TransportUnderTest | str) -> None:
    """The server dies mid-run and a new one starts on the same port(s): every node
    reconnects (re-registering where the server forgot it) and finishes the new run."""
    manager = SimpleClientManager(wait_timeout=_WAIT)
    init = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    with node_threads() as nodes:
        with running_server(client_manager=manager, run=False, rest=True) as first:
            ports = (first.port, first.rest_port or 0)
            for k in (1, 3):
                _start(first, transport, AddClient(k).to_client(), nodes)
            assert manager.wait_for(2, timeout=_WAIT)
            for proxy in manager.all().values():
                assert proxy.fit(FitIns(init, {}), timeout=_WAIT).status.code == Code.OK
        # The first server is gone without ending the run; start the second.
        strategy = _strategy(2, initial_parameters=init)
        with running_server(
            config=ServerConfig(num_rounds=2),
            strategy=strategy,
            rest=True,
            port=ports[0],
            rest_port=ports[1],
        ) as second:
            second.result(_WAIT * 2)
            _expect_clean_exit(nodes)
    params = parameters_to_ndarrays(second.server.parameters)
    np.testing.assert_array_equal(params[0], np.full(2, 5.0, np.float32))  # 2 x 2.5


def _requester(transport: TransportUnderTest, srv: RunningServer) -> Requester:
    """A built-in Fleet requester to the port the transport's nodes use."""
    if transport.listener == "grpc":
        return GrpcRereRequester(TransportSettings(srv.address, max_message_length=1 << 20))
    return RestRequester(TransportSettings(srv.rest_url, max_message_length=1 << 20))


def check_liveness(transport: TransportUnderTest | str) -> None:
    """Pull-based transports: a busy node's heartbeats keep it registered through a fit
    longer than the heartbeat timeout; a node that vanishes while holding an instruction
    is dropped after the heartbeat timeout and that instruction fails at once with
    ConnectionLost (not at the round timeout)."""
    timing = FleetTiming(heartbeat_interval=0.1, heartbeat_timeout=0.4, poll_timeout=0.5)
    params = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    manager = SimpleClientManager(wait_timeout=_WAIT)
    with (
        running_server(client_manager=manager, run=False, rest=True, timing=timing) as srv,
        node_threads() as nodes,
    ):

        class Busy(AddClient):
            def fit(
                self, parameters: NDArrays, config: Config
            ) -> tuple[NDArrays, int, dict[str, Scalar]]:
                threading.Event().wait(1.2)  # a fit that takes 3 heartbeat timeouts
                return super().fit(parameters, config)

        node = _start(srv, transport, Busy(1).to_client(), nodes)
        proxy = _wait_for_node(manager)
        assert proxy.fit(FitIns(params, {}), timeout=_WAIT).status.code == Code.OK
        proxy.reconnect(ReconnectIns(seconds=0), timeout=_WAIT)
        assert node.join(_WAIT) is None

        requester = _requester(under_test(transport), srv)
        requester.open()
        try:
            created = fleet_codec.decode_create_node_response(
                requester.call(
                    Verb.CREATE_NODE,
                    fleet_codec.encode_create_node_request(CreateNodeRequest()),
                    _WAIT,
                )
            )
            proxy = _wait_for_node(manager)
            future = proxy.submit(FitIns(params, {}), timeout=_WAIT)
            pulled = fleet_codec.decode_pull_response(
                requester.call(
                    Verb.PULL,
                    fleet_codec.encode_pull_request(PullRequest(created.node_id)),
                    _WAIT,
                )
            )
            assert pulled.task_id != 0
            # The node now vanishes: no heartbeat, no reply.
            error = future.exception(timeout=_WAIT)
            assert isinstance(error, ConnectionLost) and "no heartbeat" in str(error), error
            # its instruction fails as it is dropped; the unregistering follows at once
            assert manager.wait_until(lambda nodes: not nodes, _WAIT)
        finally:
            requester.close()
