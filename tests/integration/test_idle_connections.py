"""The gRPC listener closes connections that carry no call for the idle limit, and nodes
whose connection it closed carry on over a new one."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.server import ServerConfig
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import NodeThread, node_threads, running_server
from stamen.typing import Config, NDArrays, Scalar

WAIT = 60.0
IDLE = 0.5
# The client preface of HTTP/2 and an empty SETTINGS frame: a connection gRPC accepts.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _strategy(clients: int) -> fl.server.strategy.FedAvg:
    return fl.server.strategy.FedAvg(
        min_fit_clients=clients,
        min_available_clients=clients,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(8, np.float32)]),
    )


def _closed_after(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes ``sock`` (reading whatever it sends), or None."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            sock.settimeout(max(0.01, limit - (time.monotonic() - started)))
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_a_connection_that_opens_no_call_is_closed_after_the_idle_limit() -> None:
    timing = FleetTiming(connection_idle_limit=IDLE)
    with (
        running_server(strategy=_strategy(1), timing=timing, run=False) as srv,
        socket.create_connection(("127.0.0.1", srv.service.port), timeout=WAIT) as sock,
    ):
        sock.sendall(PREFACE)
        closed = _closed_after(sock, WAIT)
    assert closed is not None, f"the connection was still open after {WAIT} s"
    assert closed < 30 * IDLE  # gRPC checks idleness on a timer: a margin, not an hour


def test_the_default_idle_limit_outlasts_the_heartbeat_timeout() -> None:
    timing = FleetTiming(heartbeat_interval=40.0)
    assert timing.idle_limit == 2 * timing.silence_limit == 240.0
    assert FleetTiming(heartbeat_interval=1.0).idle_limit == 60.0


def _established(port: int) -> int:
    """TCP connections of this machine in state ESTABLISHED with ``port`` at either end."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                ports = {int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)}
                count += fields[3] == "01" and port in ports
    return count


class SlowClient(fl.client.NumPyClient):
    """Trains until the server has closed its (idle) grpc-rere connection: no heartbeat
    is due meanwhile (their interval is far longer), so the node has no call open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.closed_while_training: list[bool] = []

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        deadline = time.monotonic() + WAIT / 4
        wait = threading.Event()
        while _established(self.port) and time.monotonic() < deadline:
            wait.wait(0.05)
        self.closed_while_training.append(_established(self.port) == 0)
        return [p + 1 for p in parameters], 1, {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_a_grpc_rere_node_whose_connection_was_closed_while_it_trained_still_replies() -> None:
    timing = FleetTiming(connection_idle_limit=IDLE, heartbeat_interval=30.0)
    with (
        running_server(
            config=ServerConfig(num_rounds=2), strategy=_strategy(1), timing=timing
        ) as srv,
        node_threads() as nodes,
    ):
        client = SlowClient(srv.service.port)
        node: Any = NodeThread(
            {
                "server_address": srv.address_for("grpc-rere"),
                "transport": "grpc-rere",
                "client": client.to_client(),
            }
        ).start()
        nodes.append(node)
        srv.result(WAIT)
        assert node.join(WAIT) is None
    assert client.closed_while_training == [True, True]
    model = fl.common.parameters_to_ndarrays(srv.server.parameters)
    np.testing.assert_array_equal(model[0], np.full(8, 2, np.float32))


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_a_non_positive_idle_limit_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="connection_idle_limit"):
        FleetTiming(connection_idle_limit=seconds)
