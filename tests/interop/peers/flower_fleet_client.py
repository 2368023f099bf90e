"""A real Flower 1.12 node on any transport, for the Fleet API interop tests (Flower venv).

Usage: ``flower_fleet_client.py --address ADDR --client-id K --transport T [--style S]
[--key-dir DIR] [--max-retries N]``

Runs ``mixed``'s client ``K`` with ``flwr.client.start_client(transport=T)``, given as
``client=`` (``--style client``: a ``Client`` subclass) or ``client_fn=`` returning a
NumPyClient (``--style numpy``, the default). ``--key-dir`` holds ``node.pem`` and
``node.pub.pem``: the node authenticates (``authentication_keys``). Each call is printed as
``EVENT <method> [<round>]``; ``DONE`` once ``start_client`` returns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import flwr as fl
import mixed
from cryptography.hazmat.primitives import serialization
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)


class MixedNumPyClient(fl.client.NumPyClient):
    """``mixed``'s client ``client_id`` as a NumPyClient."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        print("EVENT get_parameters", flush=True)
        return mixed.initial_ndarrays()

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
        print(f"EVENT fit {config.get('round')}", flush=True)
        return mixed.fit(self.client_id, parameters, config)

    def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> Any:
        print(f"EVENT evaluate {config.get('round')}", flush=True)
        return mixed.evaluate(self.client_id, parameters, config)


class MixedClient(fl.client.Client):
    """``mixed``'s client ``client_id`` as a (non-NumPy) Client."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        print("EVENT get_parameters", flush=True)
        return GetParametersRes(
            Status(Code.OK, ""), ndarrays_to_parameters(mixed.initial_ndarrays())
        )

    def fit(self, ins: FitIns) -> FitRes:
        print(f"EVENT fit {ins.config.get('round')}", flush=True)
        arrays, n, metrics = mixed.fit(
            self.client_id, parameters_to_ndarrays(ins.parameters), ins.config
        )
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        print(f"EVENT evaluate {ins.config.get('round')}", flush=True)
        loss, n, metrics = mixed.evaluate(
            self.client_id, parameters_to_ndarrays(ins.parameters), ins.config
        )
        return EvaluateRes(Status(Code.OK, ""), loss, n, metrics)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--client-id", type=int, required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--style", choices=["numpy", "client"], default="numpy")
    parser.add_argument("--key-dir")
    parser.add_argument("--max-retries", type=int)
    args = parser.parse_args()

    keys = None
    if args.key_dir:
        folder = Path(args.key_dir)
        private = serialization.load_pem_private_key(
            (folder / "node.pem").read_bytes(), password=None
        )
        public = serialization.load_pem_public_key((folder / "node.pub.pem").read_bytes())
        keys = (private, public)

    kwargs: dict[str, Any] = {}
    if args.style == "client":
        kwargs["client"] = MixedClient(args.client_id)
    else:
        kwargs["client_fn"] = lambda context: MixedNumPyClient(args.client_id).to_client()
    fl.client.start_client(
        server_address=args.address,
        insecure=True,
        transport=args.transport,
        authentication_keys=keys,
        max_retries=args.max_retries,
        **kwargs,
    )
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
