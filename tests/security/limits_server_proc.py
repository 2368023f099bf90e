"""A fleet server alone in its own process, for tests that measure it from outside.

Usage: limits_server_proc.py MAX_MESSAGE_LENGTH MAX_UNVERIFIED_BYTES [MAX_CONNECTIONS
[ROUNDS CHECKPOINT_DIR]]

(0: the default.) Serves gRPC and REST on 127.0.0.1, ports picked by the system; prints
``PORTS <grpc> <rest>`` once serving, then serves until its stdin closes. Logs to stderr.
With ROUNDS, it also runs that many rounds of FedAvg with two nodes (checkpoints written
to CHECKPOINT_DIR) and prints ``ROUNDS <n> done`` (or ``ROUNDS error <message>``) when
they are over. The test that starts it sets its resource limits (``preexec_fn``).
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from stamen.ndarrays import ndarrays_to_parameters
from stamen.server.app import run_server
from stamen.server.checkpoint import Checkpointer
from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet.handler import FleetTiming
from stamen.server.fleet.service import FleetService
from stamen.server.server import Server, ServerConfig
from stamen.server.strategy import FedAvg


def run_rounds(rounds: int, checkpoint_dir: str) -> None:
    """Serve, run ``rounds`` rounds with two nodes, say so, then serve until stdin closes."""
    initial = ndarrays_to_parameters([np.zeros((2, 2), np.float32), np.zeros(3, np.float32)])
    strategy = FedAvg(
        initial_parameters=initial,
        min_fit_clients=2,
        min_evaluate_clients=2,
        min_available_clients=2,
    )
    server = Server(
        client_manager=SimpleClientManager(wait_timeout=60),
        strategy=strategy,
        checkpointer=Checkpointer(checkpoint_dir),
    )
    service = serve(server.client_manager())
    try:
        try:
            run_server(server, ServerConfig(num_rounds=rounds, round_timeout=60))
        except Exception as exc:  # the test reads it
            print(f"ROUNDS error {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"ROUNDS {rounds} done", flush=True)
        sys.stdin.read()
    finally:
        service.stop()


def serve(client_manager: SimpleClientManager) -> FleetService:
    """A started fleet service on both transports, its ports printed."""
    max_message_length, max_unverified, *rest = (int(a) for a in sys.argv[1:4])
    timing = FleetTiming(
        heartbeat_interval=1.0,
        heartbeat_timeout=3.0,
        poll_timeout=1.0,
        max_unverified_bytes=max_unverified or None,
        max_connections=(rest[0] if rest else 0) or None,
    )
    service = FleetService(
        client_manager,
        address="127.0.0.1:0",
        rest_address="127.0.0.1:0",
        max_message_length=max_message_length,
        timing=timing,
    )
    service.start()
    print(f"PORTS {service.port} {service.rest_port}", flush=True)
    return service


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    if len(sys.argv) > 5:
        run_rounds(int(sys.argv[4]), sys.argv[5])
        return
    service = serve(SimpleClientManager())
    try:
        sys.stdin.read()  # until the test closes it
    finally:
        service.stop()


if __name__ == "__main__":
    main()
