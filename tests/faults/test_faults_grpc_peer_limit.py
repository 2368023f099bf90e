"""One address holding gRPC connections that make no call is cut down to its limit,
while nodes from another address keep working.

A server in this process (gRPC on 127.0.0.1, ``max_grpc_unused_per_peer`` = 4, its
connection cap far away) runs one round of FedAvg with two nodes from 127.0.0.1: a
grpc-bidi node connected before the flood, a grpc-rere node started during it. 24
connections from 127.0.0.2 send the start of a gRPC call that never ends (so they never
make one) and drip a byte every 0.3 s, each reopened when the server closes it. The
server must close the ones over the per-address limit again and again (with a WARNING
naming the field and the address), without ever being near its cap, and the round must
end with both nodes' results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fault_tools import (
    GRPC_HEAD,
    WAIT,
    Drippers,
    DripSlot,
    FaultFedAvg,
    WatchedClientManager,
    node_processes,
)

from stamen.server import ServerConfig
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import running_server

LIMIT = 4
FLOOD = 24
TIMING = FleetTiming(
    heartbeat_interval=0.5,
    heartbeat_timeout=4.0,
    poll_timeout=2.0,
    max_grpc_unused_per_peer=LIMIT,
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 needs Linux")
def test_connections_without_a_call_over_the_per_address_limit_are_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = FaultFedAvg(
        start_with=2, min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0
    )
    manager = WatchedClientManager()
    drippers: Drippers | None = None
    with (
        running_server(
            config=ServerConfig(num_rounds=1),
            strategy=strategy,
            client_manager=manager,
            timing=TIMING,
        ) as srv,
        node_processes(tmp_path) as start,
    ):
        assert srv.service.grpc_connection_limit > 8 * FLOOD  # no pressure: the cap is far
        try:
            first = start(srv.address, "grpc-bidi", 1)
            manager.wait_count(lambda n: n >= 1, WAIT, "the grpc-bidi node connects")
            target = ("127.0.0.1", srv.port)
            drippers = Drippers([DripSlot(target, "127.0.0.2", GRPC_HEAD) for _ in range(FLOOD)])
            drippers.start()
            # Closed, reopened, and closed again: the limit keeps biting.
            drippers.wait_reopened(2 * (FLOOD - LIMIT), timeout=WAIT)
            second = start(srv.address, "grpc-rere", 2)
            strategy.wait_round(1, timeout=WAIT)
            exits = [first.wait_exit(), second.wait_exit()]
        finally:
            if drippers is not None:
                drippers.stop()
    assert strategy.ks(1) == [1, 2], "both nodes' results make the round"
    assert exits == ["EXIT ok", "EXIT ok"]
    assert "(FleetTiming.max_grpc_unused_per_peer)" in caplog.text
    assert "from 127.0.0.2" in caplog.text
    assert "to make room" not in caplog.text  # the per-address limit, not the cap, bit
