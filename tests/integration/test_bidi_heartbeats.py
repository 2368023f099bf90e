"""grpc-bidi heartbeats between Stamen peers: a live but silent node is released at the
heartbeat timeout even with ``round_timeout=None``; a node training for longer than that
is kept alive by its heartbeats (with and without node authentication)."""

from __future__ import annotations

import queue
import time
from typing import Any

import grpc
import numpy as np
import pytest
from integration_clients import AddClient

import stamen as fl
from stamen.errors import ConnectionLost
from stamen.protocol.fleet_server import FleetTiming
from stamen.server.strategy.strategy import FitFailures, FitResults
from stamen.testing import generate_node_keys, running_server
from stamen.typing import NDArrays, Scalar
from stamen.wire import (
    BIDI_JOIN_METHOD,
    FRAMES_METADATA,
    HEARTBEAT_MESSAGE,
    HEARTBEAT_METADATA,
    decode_instruction,
    encode_reply,
    is_heartbeat,
)

TIMING = FleetTiming(heartbeat_interval=0.2)  # silence limit: 0.6 s


class RecordingFedAvg(fl.server.strategy.FedAvg):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[tuple[FitResults, FitFailures]] = []

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[fl.common.Parameters | None, dict[str, Scalar]]:
        self.rounds.append((list(results), list(failures)))
        return super().aggregate_fit(server_round, results, failures)


def _strategy(nodes: int) -> RecordingFedAvg:
    init = fl.common.ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    return RecordingFedAvg(
        initial_parameters=init,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
    )


def test_heartbeat_message_is_field_17_alone() -> None:
    assert HEARTBEAT_MESSAGE == b"\x8a\x01\x00"
    assert is_heartbeat(HEARTBEAT_MESSAGE) and is_heartbeat(memoryview(HEARTBEAT_MESSAGE))
    assert not is_heartbeat(b"\x8a\x01\x01\x00") and not is_heartbeat(b"")


def test_silent_stamen_node_is_released_after_the_silence_limit(start_node: Any) -> None:
    """A Stamen node that asked for heartbeats and goes silent after its FitIns (its stream
    stays open) fails with ConnectionLost after the silence limit, without round_timeout;
    the round completes with the other node's result and the silent stream is closed."""
    strategy = _strategy(2)
    config = fl.server.ServerConfig(num_rounds=1, round_timeout=None)
    with running_server(config=config, strategy=strategy, timing=TIMING) as srv:
        channel = grpc.insecure_channel(srv.address)
        outbox: queue.Queue[bytes | None] = queue.Queue()
        metadata = ((FRAMES_METADATA, str(1 << 20)), (HEARTBEAT_METADATA, "1"))
        call = channel.stream_stream(BIDI_JOIN_METHOD)(iter(outbox.get, None), metadata=metadata)
        try:
            good = start_node(server_address=srv.address, client=AddClient(2.0, 1).to_client())
            instruction = decode_instruction(next(call))
            assert isinstance(instruction, fl.common.FitIns)
            assert dict(call.initial_metadata())[HEARTBEAT_METADATA] == "0.2"
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                next(call)  # silent from here on: the server ends the stream
            waited = time.monotonic() - started
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no reply or heartbeat within 0.6 s" in (info.value.details() or "")
            assert 0.5 < waited < 10
            srv.result(30)
            good.join(10)
            assert good.outcome is None
        finally:
            outbox.put(None)
            call.cancel()
            channel.close()
    [(results, failures)] = strategy.rounds
    assert len(results) == 1 and len(failures) == 1
    assert isinstance(failures[0], ConnectionLost)
    np.testing.assert_array_equal(
        fl.common.parameters_to_ndarrays(srv.server.parameters)[0], np.full(2, 2.0, np.float32)
    )


def test_heartbeats_pass_through_and_are_skipped(start_node: Any) -> None:
    """A heartbeating fake node that answers after three silence limits is kept: its
    heartbeats are skipped and its reply ends the round."""
    strategy = _strategy(1)
    config = fl.server.ServerConfig(num_rounds=1, round_timeout=None)
    with running_server(config=config, strategy=strategy, timing=TIMING) as srv:
        channel = grpc.insecure_channel(srv.address)
        outbox: queue.Queue[bytes | None] = queue.Queue()
        metadata = ((FRAMES_METADATA, str(1 << 20)), (HEARTBEAT_METADATA, "1"))
        call = channel.stream_stream(BIDI_JOIN_METHOD)(iter(outbox.get, None), metadata=metadata)
        try:
            instruction = decode_instruction(next(call))
            assert isinstance(instruction, fl.common.FitIns)
            for _ in range(18):
                time.sleep(0.1)
                outbox.put(HEARTBEAT_MESSAGE)
            params = fl.common.ndarrays_to_parameters([np.full(2, 4.0, np.float32)])
            status = fl.common.Status(fl.common.Code.OK, "")
            outbox.put(encode_reply(fl.common.FitRes(status, params, 1, {})))
            assert isinstance(decode_instruction(next(call)), fl.common.ReconnectIns)
            outbox.put(encode_reply(fl.common.DisconnectRes("RECONNECT")))
            srv.result(30)
        finally:
            outbox.put(None)
            call.cancel()
            channel.close()
    [(results, failures)] = strategy.rounds
    assert len(results) == 1 and not failures


class SlowClient(AddClient):
    """Trains for three silence limits."""

    def fit(
        self, parameters: NDArrays, config: fl.common.Config
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        time.sleep(1.8)
        return super().fit(parameters, config)


@pytest.mark.parametrize("auth", [False, True], ids=["plain", "node-auth"])
def test_node_training_longer_than_the_silence_limit_is_kept_alive(
    start_node: Any, auth: bool
) -> None:
    strategy = _strategy(1)
    keys = generate_node_keys()
    config = fl.server.ServerConfig(num_rounds=1, round_timeout=None)
    with running_server(
        config=config,
        strategy=strategy,
        timing=TIMING,
        authorized_keys=[keys[1]] if auth else None,
    ) as srv:
        kwargs: dict[str, Any] = {"authentication_keys": keys} if auth else {}
        node = start_node(
            server_address=srv.address, client=SlowClient(3.0, 1).to_client(), **kwargs
        )
        srv.result(30)
        node.join(10)
        assert node.outcome is None
    [(results, failures)] = strategy.rounds
    assert len(results) == 1 and not failures
    np.testing.assert_array_equal(
        fl.common.parameters_to_ndarrays(srv.server.parameters)[0], np.full(2, 3.0, np.float32)
    )


def test_a_heartbeat_interval_out_of_range_is_refused() -> None:
    from stamen.errors import ProtocolError
    from stamen.transport.grpc_bidi import _heartbeat_seconds

    assert _heartbeat_seconds("a", None) is None
    assert _heartbeat_seconds("a", "0.2") == 0.2
    for bad in ("0", "nan", "inf", "-1", "3601", "x", "1" * 40):
        with pytest.raises(ProtocolError, match=HEARTBEAT_METADATA):
            _heartbeat_seconds("a", bad)


def test_a_node_waits_on_its_loop_once_to_receive_and_once_to_reply(
    start_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats cost a node no wait of their own: they start on the loop without the
    node waiting, and stop within the next read or write. A node thread makes one wait
    on the client loop per message it reads or writes (plus the stream's setup and
    end), not four per instruction; rounds train as before."""
    from stamen.transport import grpc_bidi

    waits: list[str] = []
    real = grpc_bidi.run_on_client_loop

    def counted(coroutine: Any, timeout: float | None = None) -> Any:
        waits.append(coroutine.__qualname__)
        return real(coroutine, timeout)

    monkeypatch.setattr(grpc_bidi, "run_on_client_loop", counted)
    rounds = 4
    config = fl.server.ServerConfig(num_rounds=rounds, round_timeout=None)
    with running_server(config=config, strategy=_strategy(1), timing=TIMING) as srv:
        node = start_node(server_address=srv.address, client=AddClient(1.0, 1).to_client())
        srv.result(30)
        node.join(10)
        assert node.outcome is None
    reads = waits.count("GrpcBidiTransport._read")
    writes = waits.count("GrpcBidiTransport._write")
    # Each round a FitIns read and its reply written; then the ReconnectIns and its reply.
    assert (reads, writes) == (rounds + 1, rounds + 1), waits
    others = [w for w in waits if w not in ("GrpcBidiTransport._read", "GrpcBidiTransport._write")]
    # The channel, the stream, the server's response metadata (once) and the close.
    assert len(others) == 4 and others[:2] == ["_open_channel", "_join"], others
    assert others[3] == "_close", others  # (others[2]: gRPC's initial_metadata)
    np.testing.assert_array_equal(
        fl.common.parameters_to_ndarrays(srv.server.parameters)[0],
        np.full(2, float(rounds), np.float32),
    )
