"""Client nodes of a benchmark run, as threads of one process, for either framework.

Usage: ``clients.py --framework {stamen,flower} --address HOST:PORT --first K --count N
[--transport grpc-bidi] [--timeout S] [--keys DIR]``

Runs nodes ``K .. K+N-1``, each a thread calling ``start_client`` of Stamen (with the Stamen
venv's python) or of Flower (with the Flower venv's python) — the same code, since Stamen's
API is Flower's. Node ``k`` answers FitIns with ``parameters + k`` and ``num_examples=1``
(see ``workload``). With ``--keys``, node ``k`` authenticates with the private key in
``DIR/node-k.pem`` (``authentication_keys``). When every node has returned (the server
ended the run), prints ``CLIENTS ok=<n> failed=<n>`` and ``PEAK_RSS <bytes>`` and exits 0
if all ended cleanly.

Flower's ``start_client`` installs SIGINT/SIGTERM handlers each time it connects, which
Python allows only in the main thread; for Flower that one call is made a no-op (nodes in
threads cannot be interrupted one by one anyway; the driver kills the process).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import workload


def node_class(fl: Any) -> type:
    """The deterministic NumPyClient of ``fl`` (``stamen`` or ``flwr``)."""

    class AddK(fl.client.NumPyClient):  # type: ignore[misc, name-defined]
        """fit adds ``k`` to every value and reports one example."""

        def __init__(self, k: int) -> None:
            self.k = np.float32(k)

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            return [p + self.k for p in parameters], 1, {}

    return AddK


def main() -> int:
    """Run the nodes; report how they ended and the process's peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("stamen", "flower"), required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--transport", default="grpc-bidi")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keys", default=None, help="directory of node-<k>.pem private keys")
    args = parser.parse_args()

    fl = importlib.import_module("stamen" if args.framework == "stamen" else "flwr")
    if args.framework == "stamen":
        # Before the node threads exist, as a program that runs them itself should: malloc
        # settings are process-wide, and Stamen applies none at import.
        from stamen.memory import tune_allocator

        tune_allocator()
    if args.framework == "flower":
        from flwr.client import app as flower_app

        flower_app._AppStateTracker.register_signal_handler = lambda self: None
    add_k = node_class(fl)
    errors: list[str] = []
    lock = threading.Lock()

    def keys_of(k: int) -> dict[str, Any]:
        if args.keys is None:
            return {}
        from cryptography.hazmat.primitives import serialization

        pem = Path(args.keys, f"node-{k}.pem").read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
        return {"authentication_keys": (private, private.public_key())}

    def run(k: int) -> None:
        try:
            fl.client.start_client(
                server_address=args.address,
                client=add_k(k).to_client(),
                transport=args.transport,
                insecure=True,
                **keys_of(k),
            )
        except BaseException:  # reported by the driver
            with lock:
                errors.append(f"node {k}: {traceback.format_exc(limit=3)}")

    threads = [
        threading.Thread(target=run, args=(k,), daemon=True, name=f"node-{k}")
        for k in range(args.first, args.first + args.count)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    for error in errors[:5]:
        print(error, file=sys.stderr, flush=True)
    ok = args.count - stuck - len(errors)
    print(f"CLIENTS ok={ok} failed={len(errors)} stuck={stuck}", flush=True)
    print(f"PEAK_RSS {workload.peak_rss_bytes()}", flush=True)
    print(f"CPU {json.dumps(workload.cpu_seconds())}", flush=True)
    return 0 if ok == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
