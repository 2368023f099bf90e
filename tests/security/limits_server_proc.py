"""A fleet server alone in its own process, for tests that measure it from outside.

Usage: limits_server_proc.py MAX_MESSAGE_LENGTH MAX_UNVERIFIED_BYTES [MAX_CONNECTIONS]

(0: the default.) Serves gRPC and REST on 127.0.0.1, ports picked by the system; prints
``PORTS <grpc> <rest>`` once serving, then serves until its stdin closes. Logs to stderr.
The test that starts it sets its resource limits (``preexec_fn``).
"""

from __future__ import annotations

import logging
import sys

from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet.handler import FleetTiming
from stamen.server.fleet.service import FleetService


def main() -> None:
    max_message_length, max_unverified, *rest = (int(a) for a in sys.argv[1:])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    timing = FleetTiming(
        heartbeat_interval=1.0,
        heartbeat_timeout=3.0,
        poll_timeout=1.0,
        max_unverified_bytes=max_unverified or None,
        max_connections=(rest[0] if rest else 0) or None,
    )
    service = FleetService(
        SimpleClientManager(),
        address="127.0.0.1:0",
        rest_address="127.0.0.1:0",
        max_message_length=max_message_length,
        timing=timing,
    )
    service.start()
    print(f"PORTS {service.port} {service.rest_port}", flush=True)
    try:
        sys.stdin.read()  # until the test closes it
    finally:
        service.stop()


if __name__ == "__main__":
    main()
