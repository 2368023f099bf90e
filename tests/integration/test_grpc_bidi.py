"""A real federation over grpc-bidi: server and nodes on 127.0.0.1, port 0."""

from __future__ import annotations

import queue
import random
import threading
from typing import Any

import grpc
import numpy as np
import pytest
from integration_clients import AddClient

import stamen as fl
from stamen.client.app import make_node_config, make_transport, run_node
from stamen.errors import ConnectError, MessageTooLarge, NotEnoughClients, TLSError
from stamen.messages import Code, FitRes, ReconnectIns, Status
from stamen.server.client_manager import SimpleClientManager
from stamen.server.strategy.strategy import FitFailures, FitResults
from stamen.testing import FakeClock, generate_certificates, running_server
from stamen.typing import NDArrays, Scalar
from stamen.wire import BIDI_JOIN_METHOD, decode_instruction, encode_reply

OK_STATUS = Status(Code.OK, "")


class RecordingFedAvg(fl.server.strategy.FedAvg):
    """FedAvg that keeps each round's fit results and failures for the test to inspect."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[tuple[FitResults, FitFailures]] = []

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[fl.common.Parameters | None, dict[str, Scalar]]:
        self.rounds.append((list(results), list(failures)))
        return super().aggregate_fit(server_round, results, failures)


def final_ndarrays(server: fl.server.Server) -> NDArrays:
    return fl.common.parameters_to_ndarrays(server.parameters)


def test_fedavg_trains_over_grpc_bidi_and_nodes_exit_cleanly(start_node: Any) -> None:
    """3 rounds of FedAvg over grpc-bidi give the exact weighted mean, and both nodes'
    start_client return normally when the server ends the run."""
    strategy = RecordingFedAvg()
    with running_server(config=fl.server.ServerConfig(num_rounds=3), strategy=strategy) as srv:
        nodes = [
            start_node(server_address=srv.address, client=AddClient(1.0, 1).to_client()),
            start_node(server_address=srv.address, client=AddClient(3.0, 3).to_client()),
        ]
        history = srv.result(30)
        for node in nodes:
            node.join(10)
            assert node.outcome is None
    # Each round adds (1*1 + 3*3) / 4 = 2.5 to every parameter.
    params = final_ndarrays(srv.server)
    np.testing.assert_array_equal(params[0], np.full((2, 2), 7.5, dtype=np.float32))
    np.testing.assert_array_equal(params[1], np.full(3, 7.5, dtype=np.float32))
    assert params[0].dtype == np.float32
    # Evaluate: loss = sum(params[1]) = 3 * 2.5 * round, weighted the same for both.
    assert history.losses_distributed == [(1, 7.5), (2, 15.0), (3, 22.5)]
    assert [len(results) for results, _ in strategy.rounds] == [2, 2, 2]


def test_context_state_persists_and_node_id_is_minus_one(start_node: Any) -> None:
    """client_fn is called once per message with one Context whose state persists across
    the run; on grpc-bidi node_id is -1 (as in Flower)."""
    seen: list[tuple[int, int]] = []

    def client_fn(context: fl.common.Context) -> fl.client.Client:
        record = context.state.metrics_records.setdefault("calls", fl.common.MetricsRecord())
        record["n"] = int(record.get("n", 0)) + 1
        seen.append((context.node_id, int(record["n"])))
        return AddClient(1.0, 1).to_client()

    init = fl.common.ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        initial_parameters=init,
    )
    with running_server(config=fl.server.ServerConfig(num_rounds=2), strategy=strategy) as srv:
        node = start_node(server_address=srv.address, client_fn=client_fn)
        srv.result(30)
        node.join(10)
    # 2 rounds x (fit + evaluate) = 4 messages, each a new client, one growing state.
    assert seen == [(-1, 1), (-1, 2), (-1, 3), (-1, 4)]


class FailingOnce(AddClient):
    """Raises in fit during round 1 only."""

    def __init__(self) -> None:
        super().__init__(5.0, 1)
        self.calls = 0

    def fit(
        self, parameters: NDArrays, config: fl.common.Config
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("disk on fire")
        return super().fit(parameters, config)


def test_client_exception_is_a_failure_and_node_keeps_serving(start_node: Any) -> None:
    """An exception in a client's fit makes it a failure of that round (CLIENT_ERROR with the
    error's text), the round aggregates the others, and the node serves the next round."""
    strategy = RecordingFedAvg()
    with running_server(config=fl.server.ServerConfig(num_rounds=2), strategy=strategy) as srv:
        good = start_node(server_address=srv.address, client=AddClient(1.0, 1).to_client())
        flaky = start_node(server_address=srv.address, client=FailingOnce().to_client())
        srv.result(30)
        good.join(10)
        flaky.join(10)
        assert good.outcome is None and flaky.outcome is None
    (r1_results, r1_failures), (r2_results, r2_failures) = strategy.rounds
    assert len(r1_results) == 1 and len(r1_failures) == 1
    failed = r1_failures[0]
    assert isinstance(failed, tuple)
    reply = failed[1]
    assert isinstance(reply, FitRes)
    assert reply.status.code == Code.CLIENT_ERROR
    assert "RuntimeError: disk on fire" in reply.status.message
    assert len(r2_results) == 2 and not r2_failures


def test_round_timeout_drops_a_slow_client(start_node: Any) -> None:
    """With round_timeout, a client that does not answer in time is a failure (Timeout) and
    the round completes with the others; the slow node still exits cleanly afterwards."""
    release = threading.Event()

    class Slow(AddClient):
        def fit(
            self, parameters: NDArrays, config: fl.common.Config
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            release.wait(20)
            return super().fit(parameters, config)

    class ReleasingFedAvg(RecordingFedAvg):
        def aggregate_fit(
            self, server_round: int, results: FitResults, failures: FitFailures
        ) -> tuple[fl.common.Parameters | None, dict[str, Scalar]]:
            release.set()  # the round is over: let the slow node finish and see the end
            return super().aggregate_fit(server_round, results, failures)

    init = fl.common.ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    strategy = ReleasingFedAvg(initial_parameters=init, fraction_evaluate=0.0)
    config = fl.server.ServerConfig(num_rounds=1, round_timeout=0.5)
    with running_server(config=config, strategy=strategy) as srv:
        fast = start_node(server_address=srv.address, client=AddClient(2.0, 1).to_client())
        slow = start_node(server_address=srv.address, client=Slow(100.0, 1).to_client())
        try:
            srv.result(30)
        finally:
            release.set()
        fast.join(10)
        slow.join(10)
        assert slow.outcome is None
    [(results, failures)] = strategy.rounds
    assert len(results) == 1 and len(failures) == 1
    assert isinstance(failures[0], fl.errors.Timeout)
    np.testing.assert_array_equal(final_ndarrays(srv.server)[0], np.full(2, 2.0, np.float32))


def test_max_retries_makes_exactly_that_many_retries_against_a_dead_address(
    dead_address: str,
) -> None:
    """max_retries=2 against an address where nothing listens: 3 connection attempts over
    real sockets, then ConnectError (Flower's grpc-bidi ignores max_retries)."""
    config = make_node_config(
        server_address=dead_address,
        client_fn=None,
        client=AddClient(1, 1).to_client(),
        grpc_max_message_length=1 << 20,
        root_certificates=None,
        insecure=None,
        transport=None,
        authentication_keys=None,
        max_retries=2,
        max_wait_time=None,
    )
    attempts = []

    def counting_factory(cfg: Any) -> Any:
        attempts.append(1)
        return make_transport(cfg)

    clock = FakeClock()
    with pytest.raises(ConnectError, match=r"after 3 failed attempt\(s\)"):
        run_node(
            config, clock=clock, rng=random.Random(1).random, transport_factory=counting_factory
        )
    assert len(attempts) == 3
    assert len(clock.sleeps) == 2
    assert clock.sleeps[0] <= 1.0 and clock.sleeps[1] <= 2.0


def test_start_client_gives_up_with_connect_error(dead_address: str) -> None:
    """The public start_client raises ConnectError (not a silent return) when the server
    stays unreachable and max_retries=0."""
    with pytest.raises(ConnectError, match=dead_address):
        fl.client.start_client(
            server_address=dead_address, client=AddClient(1, 1).to_client(), max_retries=0
        )


def test_tls_with_root_certificates_as_bytes_and_as_path(start_node: Any, tmp_path: Any) -> None:
    """A TLS server trains nodes that trust its CA, given as PEM bytes or as a path string."""
    certs = generate_certificates()
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(certs.ca_cert)
    with running_server(
        config=fl.server.ServerConfig(num_rounds=1), certificates=certs.server_tuple
    ) as srv:
        nodes = [
            start_node(
                server_address=srv.address,
                client=AddClient(1.0, 1).to_client(),
                root_certificates=certs.ca_cert,
            ),
            start_node(
                server_address=srv.address,
                client=AddClient(3.0, 3).to_client(),
                root_certificates=str(ca_path),
            ),
        ]
        srv.result(30)
        for node in nodes:
            node.join(10)
            assert node.outcome is None
    np.testing.assert_array_equal(final_ndarrays(srv.server)[1], np.full(3, 2.5, np.float32))


def test_plaintext_client_cannot_join_a_tls_server() -> None:
    """A node that connects in plaintext to a TLS server fails with ConnectError."""
    certs = generate_certificates()
    with running_server(certificates=certs.server_tuple, run=False) as srv:
        with pytest.raises(TLSError, match="speaks TLS but the node connects in plaintext"):
            fl.client.start_client(
                server_address=srv.address, client=AddClient(1, 1).to_client(), max_retries=0
            )
        assert srv.server.client_manager().num_available() == 0


def test_untrusted_server_certificate_is_refused() -> None:
    """A node whose root certificates do not include the server's CA does not connect."""
    certs, other = generate_certificates(), generate_certificates()
    with (
        running_server(certificates=certs.server_tuple, run=False) as srv,
        pytest.raises(ConnectError),
    ):
        fl.client.start_client(
            server_address=srv.address,
            client=AddClient(1, 1).to_client(),
            root_certificates=other.ca_cert,
            max_retries=0,
        )


def test_reconnect_ins_with_seconds_makes_the_node_leave_and_rejoin(start_node: Any) -> None:
    """ReconnectIns(seconds=1): the node answers RECONNECT, leaves, rejoins after the delay
    as a new stream; ReconnectIns(0) then ends start_client normally with ACK."""
    manager = SimpleClientManager(wait_timeout=20)
    with running_server(client_manager=manager, run=False) as srv:
        node = start_node(server_address=srv.address, client=AddClient(1, 1).to_client())
        assert manager.wait_for(1, timeout=20)
        [first] = manager.all().values()
        assert first.reconnect(ReconnectIns(seconds=1), timeout=10).reason == "RECONNECT"
        # the answer can arrive before the old stream is unregistered: wait for a new one
        assert manager.wait_until(lambda nodes: len(nodes) == 1 and first.cid not in nodes, 20)
        [second] = manager.all().values()
        assert second.reconnect(ReconnectIns(seconds=0), timeout=10).reason == "RECONNECT"
        node.join(10)
        assert node.outcome is None


def test_server_refuses_to_send_over_its_message_limit_to_a_node_without_frames() -> None:
    """A node that does not announce frames (a Flower node) gets whole messages only: an
    instruction over grpc_max_message_length is not sent (MessageTooLarge naming the sizes)
    and the node stays connected and keeps working."""
    manager = SimpleClientManager(wait_timeout=20)
    with running_server(client_manager=manager, run=False, grpc_max_message_length=4096) as srv:
        channel = grpc.insecure_channel(srv.address)
        outbox: queue.Queue[bytes | None] = queue.Queue()
        call = channel.stream_stream(BIDI_JOIN_METHOD)(iter(outbox.get, None))
        try:
            assert manager.wait_for(1, timeout=20)
            [proxy] = manager.all().values()
            big = fl.common.ndarrays_to_parameters([np.zeros(10_000, dtype=np.float32)])
            with pytest.raises(MessageTooLarge, match="over grpc_max_message_length=4096"):
                proxy.fit(fl.common.FitIns(big, {}), timeout=10)
            small = fl.common.ndarrays_to_parameters([np.zeros(4, dtype=np.float32)])
            future = proxy.submit(fl.common.FitIns(small, {}), timeout=10)
            instruction = decode_instruction(next(call))
            assert isinstance(instruction, fl.common.FitIns)
            outbox.put(encode_reply(FitRes(OK_STATUS, instruction.parameters, 3, {})))
            reply = future.result(timeout=10)
            assert isinstance(reply, FitRes) and reply.num_examples == 3
        finally:
            outbox.put(None)
            call.cancel()
            channel.close()


def test_large_messages_travel_in_frames_between_stamen_peers(start_node: Any) -> None:
    """Between Stamen peers, an instruction 10x the server's grpc_max_message_length and
    the reply to it travel in frames (each within the bound) and arrive intact."""
    manager = SimpleClientManager(wait_timeout=20)
    with running_server(client_manager=manager, run=False, grpc_max_message_length=4096) as srv:
        node = start_node(
            server_address=srv.address,
            client=AddClient(1, 1).to_client(),
            grpc_max_message_length=4096,
        )
        assert manager.wait_for(1, timeout=20)
        [proxy] = manager.all().values()
        model = np.arange(10_000, dtype=np.float32)
        big = fl.common.ndarrays_to_parameters([model])
        reply = proxy.fit(fl.common.FitIns(big, {}), timeout=10)
        [result] = fl.common.parameters_to_ndarrays(reply.parameters)
        np.testing.assert_array_equal(result, model + 1)
        proxy.reconnect(ReconnectIns(0), timeout=10)
        node.join(10)


def test_server_frames_to_the_bound_the_node_announced(start_node: Any) -> None:
    """A node whose grpc_max_message_length is smaller than the server's announces it; the
    server frames a larger instruction to the node's bound, and the run goes on. (A server
    that ignores the bound is refused with MessageTooLarge: tests/faults.)"""
    manager = SimpleClientManager(wait_timeout=20)
    with running_server(client_manager=manager, run=False) as srv:
        node = start_node(
            server_address=srv.address,
            client=AddClient(1, 1).to_client(),
            grpc_max_message_length=4096,
        )
        assert manager.wait_for(1, timeout=20)
        [proxy] = manager.all().values()
        big = fl.common.ndarrays_to_parameters([np.zeros(10_000, dtype=np.float32)])
        reply = proxy.fit(fl.common.FitIns(big, {}), timeout=10)
        [result] = fl.common.parameters_to_ndarrays(reply.parameters)
        np.testing.assert_array_equal(result, np.ones(10_000, dtype=np.float32))
        proxy.reconnect(ReconnectIns(0), timeout=10)
        node.join(10)
        assert node.outcome is None


@pytest.mark.parametrize("window", [1, 2])
def test_frames_to_every_node_together_stay_within_the_send_window(
    start_node: Any, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Three nodes are sent a model of ten frames at once: the frames being written on
    every stream together never outnumber the server's send window, and every node gets
    its model whole."""
    from stamen.server.fleet import grpc_bidi

    live, most, written = [0], [0], [0]
    paced = grpc_bidi._write_paced

    async def counted(context: Any, messages: Any, places: Any) -> None:
        class Counting:  # on the server's loop: no lock needed
            async def write(self, message: bytes) -> None:
                live[0] += 1
                most[0] = max(most[0], live[0])
                try:
                    await context.write(message)
                    written[0] += 1
                finally:
                    live[0] -= 1

        await paced(Counting(), messages, places)

    monkeypatch.setattr(grpc_bidi, "SEND_WINDOW", window)
    monkeypatch.setattr(grpc_bidi, "_write_paced", counted)
    manager = SimpleClientManager(wait_timeout=20)
    with running_server(client_manager=manager, run=False, grpc_max_message_length=4096) as srv:
        nodes = [
            start_node(
                server_address=srv.address,
                client=AddClient(k, 1).to_client(),
                grpc_max_message_length=4096,
            )
            for k in range(3)
        ]
        assert manager.wait_for(3, timeout=20)
        model = np.arange(10_000, dtype=np.float32)  # 40 KB: ten 4 KB frames
        big = fl.common.ndarrays_to_parameters([model])
        proxies = list(manager.all().values())
        replies: queue.Queue[Any] = queue.Queue()
        senders = [
            threading.Thread(
                target=lambda p=p: replies.put(p.fit(fl.common.FitIns(big, {}), timeout=20))
            )
            for p in proxies
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        results = sorted(
            float(fl.common.parameters_to_ndarrays(replies.get(timeout=1).parameters)[0][0])
            for _ in proxies
        )
        assert results == [0.0, 1.0, 2.0]  # node k adds k
        for proxy in proxies:
            proxy.reconnect(ReconnectIns(0), timeout=10)
        for node in nodes:
            node.join(10)
    assert written[0] >= 30
    assert 1 <= most[0] <= window, most  # three streams at once without the window


def test_run_fails_clearly_when_clients_never_come() -> None:
    """With too few clients the run fails after the client manager's wait_timeout with
    NotEnoughClients naming the counts; it does not wait 24 hours."""
    manager = SimpleClientManager(wait_timeout=0.3)
    with (
        running_server(client_manager=manager) as srv,
        pytest.raises(
            NotEnoughClients, match=r"needed 1 connected client\(s\), had 0 after waiting 0.3 s"
        ),
    ):
        srv.result(20)


def test_node_leaving_mid_round_is_a_failure_at_once(start_node: Any) -> None:
    """A node that dies while holding an instruction fails that instruction immediately
    (ConnectionLost), not at round_timeout."""
    manager = SimpleClientManager(wait_timeout=20)
    entered = threading.Event()

    class Crashing(AddClient):
        def fit(
            self, parameters: NDArrays, config: fl.common.Config
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            entered.set()
            raise KeyboardInterrupt  # escapes dispatch: the node process "dies"

    with running_server(client_manager=manager, run=False) as srv:
        node = start_node(server_address=srv.address, client=Crashing(1, 1).to_client())
        assert manager.wait_for(1, timeout=20)
        [proxy] = manager.all().values()
        params = fl.common.ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
        future = proxy.submit(fl.common.FitIns(params, {}), timeout=60)
        assert entered.wait(10)
        assert isinstance(future.exception(timeout=10), fl.errors.ConnectionLost)
        node.join(10)
        assert isinstance(node.outcome, KeyboardInterrupt)
