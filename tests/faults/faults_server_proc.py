"""A Stamen server in its own process, for crash tests.

Usage: faults_server_proc.py CHECKPOINT_DIR RESULT_JSON ROUNDS GRPC_PORT REST_PORT [KILL]

Prints ``PORTS <grpc> <rest>`` once serving. KILL makes the process SIGKILL itself at a
chosen moment of round 3: ``mid-fit`` (instructions sent, results not back),
``mid-aggregation`` (inside aggregate_fit) or ``mid-write`` (after two files of round 3's
checkpoint are written). Without KILL it runs to the end and writes the final parameters
and History to RESULT_JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import numpy as np

from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server.app import run_server
from stamen.server.checkpoint import Checkpointer
from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet.service import FleetService
from stamen.server.server import Server, ServerConfig
from stamen.server.strategy import FedAvg

KILL_ROUND = 3


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Killing(FedAvg):
    def __init__(self, kill: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kill = kill

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.kill == "mid-fit" and server_round == KILL_ROUND:
            # Send the instructions, then die while the nodes are fitting.
            for proxy, ins in instructions:
                proxy.submit(ins, None)
            print("DYING mid-fit", flush=True)
            die()
        return instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        if self.kill == "mid-aggregation" and server_round == KILL_ROUND:
            die()
        return super().aggregate_fit(server_round, results, failures)


def main() -> None:
    checkpoint_dir, result_path, rounds, grpc_port, rest_port = sys.argv[1:6]
    kill = sys.argv[6] if len(sys.argv) > 6 else None
    written: list[str] = []

    def on_file(name: str) -> None:
        written.append(name)
        completed = written.count("manifest.json")
        since = (
            len(written)
            - 1
            - max((i for i, n in enumerate(written) if n == "manifest.json"), default=-1)
        )
        if kill == "mid-write" and completed == KILL_ROUND - 1 and since == 2:
            die()  # two files of round 3's checkpoint are on disk, the manifest is not

    init = ndarrays_to_parameters([np.zeros((2, 2), np.float32), np.zeros(3, np.float32)])
    strategy = Killing(kill, initial_parameters=init)
    server = Server(
        client_manager=SimpleClientManager(wait_timeout=60),
        strategy=strategy,
        checkpointer=Checkpointer(checkpoint_dir, on_file_written=on_file),
    )
    service = FleetService(
        server.client_manager(),
        address=f"127.0.0.1:{grpc_port}",
        rest_address=f"127.0.0.1:{rest_port}",
        max_message_length=1 << 20,
    )
    service.start()
    print(f"PORTS {service.port} {service.rest_port}", flush=True)
    try:
        history = run_server(server, ServerConfig(num_rounds=int(rounds)))
    finally:
        service.stop()
    result = {
        "parameters": [a.tolist() for a in parameters_to_ndarrays(server.parameters)],
        "history": history.to_dict(),
    }
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
