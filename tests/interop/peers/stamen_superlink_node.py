"""A Stamen node for the SuperLink interop tests (run by the dev venv's python).

Usage: ``stamen_superlink_node.py --address HOST:PORT --client-id K --transport T
[--root-certificates CA.pem] [--key NODE_KEY.pem]``

Runs ``stamen.client.start_client`` with ``scenario``'s client ``K``. Against a Flower
SuperLink the node serves until it is stopped, like a Flower SuperNode: SIGTERM raises
KeyboardInterrupt in ``start_client``, which unregisters the node (DeleteNode) and
re-raises; this script then prints ``STOPPED`` and exits 0. Each client call prints
``EVENT <call> <round>``; an error from ``start_client`` prints ``ERROR <type>: <text>``
and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import scenario
from cryptography.hazmat.primitives import serialization

import stamen as fl


class Client(fl.client.NumPyClient):
    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        print("EVENT get_parameters", flush=True)
        return scenario.get_parameters(self.client_id)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        print(f"EVENT fit {config.get('round')}", flush=True)
        return scenario.fit(self.client_id, parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        print(f"EVENT evaluate {config.get('round')}", flush=True)
        return scenario.evaluate(self.client_id, parameters, config)


def _stop(_signum: int, _frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--client-id", type=int, required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--root-certificates", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _stop)
    keys = None
    if args.key is not None:
        private = serialization.load_pem_private_key(args.key.read_bytes(), None)
        keys = (private, private.public_key())  # type: ignore[union-attr]
    print("READY", flush=True)
    try:
        fl.client.start_client(
            server_address=args.address,
            client_fn=lambda _context: Client(args.client_id).to_client(),
            transport=args.transport,
            root_certificates=args.root_certificates.read_bytes()
            if args.root_certificates
            else None,
            insecure=None if args.root_certificates else True,
            authentication_keys=keys,
            max_retries=3,
            max_wait_time=10.0,
        )
    except KeyboardInterrupt:
        print("STOPPED", flush=True)
        return 0
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        return 1
    print("RETURNED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
