"""Nothing secret reaches the dashboard: no parameters, no keys, no non-numeric metrics.

A real run (two authenticated nodes on 127.0.0.1) with a dashboard; every endpoint's
output, the event stream included, is searched for the model's values, the metrics'
text and bytes and every form of the nodes' and server's keys. The JSON carries only
the fields the documentation lists.
"""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization

from stamen.client import NumPyClient
from stamen.server import ServerConfig, start_server
from stamen.server.strategy import FedAvg
from stamen.testing import NodeThread, node_threads
from stamen.testing.certs import generate_node_keys

MARKER = 4242.125
SECRET_TEXT = "TOPSECRET-STRING"
SECRET_BYTES = b"TOPSECRET-BYTES"

STATE_KEYS = {
    "version",
    "history_version",
    "now",
    "run",
    "waiting",
    "round",
    "rounds_done",
    "failures_total",
    "nodes",
}
NODE_KEYS = {
    "id",
    "transport",
    "peer",
    "connected_since",
    "last_heard",
    "status",
    "left_at",
    "left_reason",
    "last_round",
    "failed_round",
    "outcome",
    "last_failure",
    "failures",
}


class MarkedClient(NumPyClient):
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.full(16, MARKER, dtype=np.float64)]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return [np.full(16, MARKER, dtype=np.float64)], 5, {"note": SECRET_TEXT}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return 0.5, 5, {"accuracy": 0.75, "blob": SECRET_BYTES, "note": SECRET_TEXT}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key_forms(private: Any, public: Any) -> list[bytes]:
    """Every way a key could be written out: PEM, DER, base64 of DER, raw point, hex."""
    forms = []
    der_public = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    private_value = private.private_numbers().private_value.to_bytes(32, "big")
    for raw in (der_public, point, private_value):
        forms += [raw, base64.b64encode(raw)[8:40], raw.hex().encode()[8:40]]
        forms.append(base64.urlsafe_b64encode(raw)[8:40])
    return forms


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, path
        return response.read()
    finally:
        conn.close()


def test_no_parameters_keys_or_non_numeric_metrics_in_any_endpoint() -> None:
    node_keys = [generate_node_keys() for _ in range(2)]
    server_keys = generate_node_keys()
    fleet = f"127.0.0.1:{_free_port()}"
    port = _free_port()
    strategy = FedAvg(
        min_fit_clients=2,
        min_evaluate_clients=2,
        min_available_clients=2,
        fit_metrics_aggregation_fn=lambda pairs: {"note": SECRET_TEXT, "n": len(pairs)},
        evaluate_metrics_aggregation_fn=lambda pairs: {
            "accuracy": 0.75,
            "note": SECRET_TEXT,
            "blob": SECRET_BYTES,
        },
    )
    outcome: list[Any] = []
    collected: list[bytes] = []
    stream_done = threading.Event()

    def serve() -> None:
        try:
            outcome.append(
                start_server(
                    server_address=fleet,
                    strategy=strategy,
                    config=ServerConfig(num_rounds=2, round_timeout=30),
                    authorized_keys=[public for _, public in node_keys],
                    server_keys=server_keys,
                    dashboard_address=f"127.0.0.1:{port}",
                )
            )
        except BaseException as exc:
            outcome.append(exc)

    def stream() -> None:
        """The event stream from the start of the run to its end."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
                while chunk := sock.recv(65536):
                    collected.append(chunk)
        finally:
            stream_done.set()

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the dashboard never started"
            time.sleep(0.05)
    threading.Thread(target=stream, daemon=True).start()
    with node_threads() as nodes:
        for keys in node_keys:
            node = NodeThread(
                {
                    "server_address": fleet,
                    "client": MarkedClient().to_client(),
                    "transport": "grpc-rere",
                    "authentication_keys": keys,
                }
            )
            nodes.append(node.start())
        # Read every endpoint while the run goes on.
        while server_thread.is_alive():
            for path in ("/", "/api/state", "/api/history", "/static/app.js"):
                try:
                    collected.append(_get(port, path))
                except OSError:
                    break  # the run ended and the dashboard with it
            time.sleep(0.05)
    server_thread.join(30)
    assert stream_done.wait(10)
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    seen = b"".join(collected)
    assert b'"accuracy":0.75' in seen  # the stream and endpoints did carry the run
    assert b'"transport":"grpc-rere"' in seen
    # The model's value as JSON or text (4242.125, or rounded to 4242.12): a bare "4242"
    # turns up by chance in the digits of timestamps and port numbers.
    assert b"4242.12" not in seen
    assert np.float64(MARKER).tobytes() not in seen
    assert base64.b64encode(np.full(4, MARKER).tobytes()) not in seen
    assert SECRET_TEXT.encode() not in seen
    assert SECRET_BYTES not in seen
    assert base64.b64encode(SECRET_BYTES) not in seen
    assert b"PRIVATE KEY" not in seen and b"PUBLIC KEY" not in seen
    for private, public in [*node_keys, server_keys]:
        for form in _key_forms(private, public):
            assert form not in seen


def test_the_json_carries_only_documented_fields() -> None:
    """A new field in the state must be added here (and to docs/dashboard.md) on purpose."""
    from stamen.server.dashboard import DashboardState
    from stamen.server.events import (
        NodeJoined,
        ReplyArrived,
        RoundEnded,
        RoundStarted,
        RunStarted,
    )

    state = DashboardState()
    state(NodeJoined("a", "rest", "ipv4:127.0.0.1:1"))
    state(RunStarted(1, "FedAvg"))
    state(RoundStarted(1, "fit", 1))
    state(ReplyArrived(1, "fit", "a", False, "boom"))
    state(RoundEnded(1, "fit", 0, 1, 0.1, aggregated=False, reasons=("no results",)))
    snap = state.snapshot()
    assert set(snap) == STATE_KEYS
    assert set(snap["run"]) == {
        "status",
        "strategy",
        "num_rounds",
        "first_round",
        "started_at",
        "ended_at",
        "seconds",
        "reason",
    }
    assert set(snap["nodes"]) == {"connected", "joined_total", "left_total", "shown", "list"}
    assert set(snap["nodes"]["list"][0]) == NODE_KEYS
    assert set(snap["round"]) == {
        "round",
        "phase",
        "expected",
        "results",
        "failures",
        "failed",
        "started_at",
        "ended",
    }
    phase = {"results", "failures", "seconds", "aggregated", "loss", "metrics", "reasons"}
    assert set(snap["round"]["ended"]) == phase
    history = state.history()
    assert set(history) == {"history_version", "rounds"}
    assert set(history["rounds"][0]) == {"round", "fit", "evaluate", "ended_at"}
    assert set(history["rounds"][0]["fit"]) == phase | {"failed"}
    assert set(history["rounds"][0]["fit"]["failed"][0]) == {"id", "reason"}
