"""A real Flower 1.12 client node for the interop tests (run only by the Flower venv's python).

Usage: ``flower_client.py --address HOST:PORT --client-id K``

Connects with ``flwr.client.start_client(transport="grpc-bidi", insecure=True)`` and runs
``scenario``'s client ``K``. Each call the server makes is printed on stdout as
``EVENT <method> [<round>]`` (flushed), so the test can tell which messages crossed the
wire. Exits 0 when the server ends the session with ``ReconnectIns``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import flwr as fl
import scenario


class ScenarioClient(fl.client.NumPyClient):
    """``scenario``'s client ``client_id`` as a Flower NumPyClient."""

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        print("EVENT get_parameters", flush=True)
        return scenario.get_parameters(self.client_id)

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
        print(f"EVENT fit {config.get('round')}", flush=True)
        return scenario.fit(self.client_id, parameters, config)

    def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> Any:
        print(f"EVENT evaluate {config.get('round')}", flush=True)
        return scenario.evaluate(self.client_id, parameters, config)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--client-id", type=int, required=True)
    args = parser.parse_args()

    def client_fn(context: Any) -> Any:
        return ScenarioClient(args.client_id).to_client()

    fl.client.start_client(
        server_address=args.address,
        client_fn=client_fn,
        insecure=True,
        transport="grpc-bidi",
    )
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
