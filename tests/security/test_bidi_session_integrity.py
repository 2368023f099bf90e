"""grpc-bidi with node authentication: every message of the Join stream is bound to the
signed opening, and a revoked key ends its open streams.

A man in the middle here is a real gRPC relay (in-process, on 127.0.0.1) between the node
and the server: it forwards the node's signed opening and the server's initial metadata
unchanged, then rewrites, injects, replays or reorders messages on the stream. Without
node authentication the same relay changes the final model (the attack works); with it,
the altered message fails its MAC, the stream ends (the node raises AuthError, the server
logs the refusal) and the model is not changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from stamen.errors import AuthError, RunError
from stamen.messages import FitIns, ReconnectIns
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.protocol.auth import HEADER_SESSION, MAC_BYTES
from stamen.protocol.fleet_server import FleetTiming
from stamen.server.client_manager import SimpleClientManager
from stamen.server.server import ServerConfig
from stamen.server.strategy import FedAvg
from stamen.testing import NodeThread, generate_node_keys, node_threads, running_server
from stamen.testing.conformance import AddClient
from stamen.wire import BIDI_JOIN_METHOD, BIDI_METHOD_NAME, BIDI_SERVICE_NAME, FRAMES_METADATA

_UNBOUNDED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_FORWARDED = frozenset({FRAMES_METADATA, HEADER_SESSION})

Tamper = Callable[[int, bytes], list[bytes]]
"""What the relay sends on for the ``index``-th message of one direction."""


def _forward(_index: int, message: bytes) -> list[bytes]:
    return [message]


class BidiRelay:
    """A gRPC relay of the Join stream: forwards the opening's metadata (signature
    included) and the server's initial metadata, and passes each message through
    ``up`` (node to server) or ``down`` (server to node)."""

    def __init__(
        self,
        upstream: str,
        *,
        up: Tamper = _forward,
        down: Tamper = _forward,
        forwarded: frozenset[str] = _FORWARDED,
    ) -> None:
        self.up, self.down, self.forwarded = up, down, forwarded
        self.tampered = threading.Event()
        self._channel = grpc.insecure_channel(upstream, options=_UNBOUNDED)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4), options=_UNBOUNDED)
        method = grpc.stream_stream_rpc_method_handler(self._join)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(BIDI_SERVICE_NAME, {BIDI_METHOD_NAME: method}),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _join(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        opening = tuple(
            (k, v)
            for k, v in context.invocation_metadata()
            if k.startswith("x-stamen-") or k in _FORWARDED
        )

        def upward() -> Iterator[bytes]:
            try:
                for index, message in enumerate(requests):
                    yield from self.up(index, message)
            except grpc.RpcError:  # the node's side ended
                return

        call = self._channel.stream_stream(BIDI_JOIN_METHOD)(upward(), metadata=opening)
        context.add_callback(call.cancel)
        context.send_initial_metadata(
            tuple((k, v) for k, v in call.initial_metadata() or () if k in self.forwarded)
        )
        try:
            for index, message in enumerate(call):
                yield from self.down(index, message)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                context.abort(exc.code(), exc.details() or "")

    def close(self) -> None:
        self._server.stop(grace=None).wait(10)
        self._channel.close()


def _f32(value: float) -> bytes:
    return np.float32(value).tobytes()


def _rewrite(old: float, new: float, relay: list[BidiRelay]) -> Tamper:
    """Rewrite every float32 ``old`` in the message as ``new`` (its MAC is left as it was:
    the relay cannot compute a new one)."""

    def tamper(_index: int, message: bytes) -> list[bytes]:
        if _f32(old) in message:
            relay[0].tampered.set()
            message = message.replace(_f32(old), _f32(new))
        return [message]

    return tamper


def _inject(relay: list[BidiRelay]) -> Tamper:
    """Before the node's first reply, inject a forged one (the reply rewritten, with a MAC
    trailer of the right shape)."""

    def tamper(index: int, message: bytes) -> list[bytes]:
        if index != 0:
            return [message]
        relay[0].tampered.set()
        forged = message[:-MAC_BYTES].replace(_f32(8.5), _f32(508.5)) + bytes(MAC_BYTES)
        return [forged, message]

    return tamper


def _replay(relay: list[BidiRelay]) -> Tamper:
    """Send the node's round-1 reply again in place of its round-2 reply (its MAC is valid:
    for the first message of the stream)."""
    seen: list[bytes] = []

    def tamper(index: int, message: bytes) -> list[bytes]:
        seen.append(message)
        if index == 1:
            relay[0].tampered.set()
            return [seen[0]]
        return [message]

    return tamper


def _reorder(relay: list[BidiRelay]) -> Tamper:
    """Swap the first two frames of the server's first (framed) instruction."""
    held: list[bytes] = []

    def tamper(index: int, message: bytes) -> list[bytes]:
        if index == 0:
            held.append(message)
            return []
        if index == 1:
            relay[0].tampered.set()
            return [message, held.pop()]
        return [message]

    return tamper


def _run(
    *,
    auth: bool,
    rounds: int,
    up: Callable[[list[BidiRelay]], Tamper] | None = None,
    down: Callable[[list[BidiRelay]], Tamper] | None = None,
    size: int = 2,
    node_limit: int | None = None,
    forwarded: frozenset[str] = _FORWARDED,
) -> tuple[np.ndarray, BaseException | None, bool]:
    """One node (AddClient(7)) trains ``rounds`` rounds from a model of 1.5s through the
    relay; returns the final model, how the node ended, and whether the relay tampered."""
    keys = generate_node_keys()
    init = ndarrays_to_parameters([np.full(size, 1.5, dtype=np.float32)])
    strategy = FedAvg(
        initial_parameters=init,
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_available_clients=1,
    )
    holder: list[BidiRelay] = []
    with (
        running_server(
            config=ServerConfig(rounds, round_timeout=20),
            strategy=strategy,
            authorized_keys=[keys[1]] if auth else None,
        ) as srv,
        node_threads() as nodes,
    ):
        relay = BidiRelay(
            srv.address,
            up=_forward if up is None else up(holder),
            down=_forward if down is None else down(holder),
            forwarded=forwarded,
        )
        holder.append(relay)
        try:
            kwargs: dict[str, Any] = {
                "server_address": relay.address,
                "transport": "grpc-bidi",
                "client": AddClient(7).to_client(),
                "max_retries": 0,
            }
            if auth:
                kwargs["authentication_keys"] = keys
            if node_limit is not None:
                kwargs["grpc_max_message_length"] = node_limit
            node = NodeThread(kwargs).start()
            nodes.append(node)
            run_error = ""
            try:
                srv.result(60)
            except RunError as exc:  # no round aggregated anything
                run_error = str(exc)
            assert not run_error or "aggregated" in run_error
            for proxy in list(srv.server.client_manager().all().values()):
                proxy.submit(ReconnectIns(0), timeout=5)
            outcome = node.join(30)
        finally:
            relay.close()
        final = parameters_to_ndarrays(srv.server.parameters)[0]
    return final, outcome, relay.tampered.is_set()


def test_without_node_authentication_the_relay_changes_the_model() -> None:
    """The control: with no node authentication (as on Flower's grpc-bidi), the relay's
    rewritten FitRes becomes the model (8.5 -> 508.5) and nothing notices."""
    final, outcome, tampered = _run(auth=False, rounds=1, up=lambda r: _rewrite(8.5, 508.5, r))
    assert tampered
    assert outcome is None
    np.testing.assert_array_equal(final, np.full(2, 508.5, np.float32))


def test_an_honest_relay_changes_nothing() -> None:
    """With node authentication, a relay that alters nothing is invisible: two rounds train
    (1.5 + 7 + 7) and the node leaves normally."""
    final, outcome, _ = _run(auth=True, rounds=2)
    assert outcome is None
    np.testing.assert_array_equal(final, np.full(2, 15.5, np.float32))


CASES: dict[str, dict[str, Any]] = {
    # node -> server
    "rewritten-fitres": {"rounds": 1, "up": lambda r: _rewrite(8.5, 508.5, r), "model": 1.5},
    "injected-fitres": {"rounds": 1, "up": _inject, "model": 1.5},
    "replayed-fitres": {"rounds": 2, "up": _replay, "model": 8.5},
    # server -> node
    "rewritten-fitins": {"rounds": 1, "down": lambda r: _rewrite(1.5, 101.5, r), "model": 1.5},
    "stripped-session-key": {  # the node is left to think the server does not MAC
        "rounds": 1,
        "forwarded": frozenset({FRAMES_METADATA}),
        "model": 1.5,
    },
    "reordered-frames": {
        "rounds": 1,
        "down": _reorder,
        "model": 1.5,
        "size": 10_000,
        "node_limit": 4096,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampering_relay_is_detected_and_the_model_is_unchanged(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With node authentication, each tampering (a FitRes rewritten, a forged message
    injected, an earlier reply replayed, a FitIns rewritten, the frames of an instruction
    reordered, the server's session key removed) fails a MAC: the stream ends, the node
    raises AuthError naming the MAC (its own check, or the server's UNAUTHENTICATED), the
    tampered round fails, and the model is what the untampered rounds made of it."""
    spec = dict(CASES[case])
    expected = spec.pop("model")
    caplog.set_level(logging.WARNING, logger="stamen.server")
    final, outcome, tampered = _run(auth=True, **spec)
    assert tampered or "forwarded" in spec
    assert isinstance(outcome, AuthError), repr(outcome)
    assert "MAC" in str(outcome), outcome
    np.testing.assert_array_equal(final, np.full(final.shape, expected, np.float32))
    if "up" in spec:  # the server found it, and said so
        assert any("fails its MAC" in r.getMessage() for r in caplog.records), caplog.text


def _pem(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_revoked_key_ends_its_open_stream_within_one_heartbeat(tmp_path: Path) -> None:
    """A node trains on an open grpc-bidi stream; its key is deleted from the authorized
    keys file; within one heartbeat interval the server ends the stream (UNAUTHENTICATED:
    the node raises AuthError, not retried) and the node is gone from the server."""
    interval = 2.0
    keys, other = generate_node_keys(), generate_node_keys()
    key_file = tmp_path / "authorized_keys"
    key_file.write_bytes(_pem(keys[1]) + _pem(other[1]))
    manager = SimpleClientManager(wait_timeout=20)
    params = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    with (
        running_server(
            client_manager=manager,
            run=False,
            authorized_keys=str(key_file),
            timing=FleetTiming(heartbeat_interval=interval),
        ) as srv,
        node_threads() as nodes,
    ):
        node = NodeThread(
            {
                "server_address": srv.address,
                "transport": "grpc-bidi",
                "client": AddClient(1).to_client(),
                "authentication_keys": keys,
                "max_retries": 0,
            }
        ).start()
        nodes.append(node)
        assert manager.wait_for(1, timeout=20)
        [proxy] = manager.all().values()
        assert proxy.submit(FitIns(params, {}), timeout=10).exception(timeout=10) is None
        key_file.write_bytes(_pem(other[1]))  # revoke the node's key
        revoked = time.monotonic()
        outcome = node.join(interval + 10)
        ended = time.monotonic() - revoked
        assert isinstance(outcome, AuthError), repr(outcome)
        assert "no longer authorized" in str(outcome)
        assert ended < interval + 1.5, ended
        deadline = time.monotonic() + 5
        while manager.all() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not manager.all()


def test_a_node_with_keys_trains_with_a_server_without_node_authentication() -> None:
    """As on grpc-rere and rest, a node with authentication_keys trains with a Stamen
    server that does not authenticate nodes (no session key offered: no MACs)."""
    keys = generate_node_keys()
    init = ndarrays_to_parameters([np.full(2, 1.5, dtype=np.float32)])
    strategy = FedAvg(
        initial_parameters=init, fraction_evaluate=0.0, min_fit_clients=1, min_available_clients=1
    )
    with (
        running_server(config=ServerConfig(1), strategy=strategy) as srv,
        node_threads() as nodes,
    ):
        node = NodeThread(
            {
                "server_address": srv.address,
                "transport": "grpc-bidi",
                "client": AddClient(7).to_client(),
                "authentication_keys": keys,
            }
        ).start()
        nodes.append(node)
        srv.result(30)
        assert node.join(30) is None
    final = parameters_to_ndarrays(srv.server.parameters)[0]
    np.testing.assert_array_equal(final, np.full(2, 8.5, np.float32))
