"""One server, three node processes (one per transport), with the public API only.

Usage: three_transports_app.py server | three_transports_app.py node TRANSPORT ADDRESS K
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

import stamen as fl
from stamen.testing.conformance import AddClient

if __name__ == "__main__":
    if sys.argv[1] == "server":
        # The bound ports (port 0 picks free ones) are logged at INFO: the test reads them.
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        init = fl.common.ndarrays_to_parameters(
            [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
        )
        strategy = fl.server.strategy.FedAvg(
            min_fit_clients=3,
            min_evaluate_clients=3,
            min_available_clients=3,
            initial_parameters=init,
        )
        history = fl.server.start_server(
            server_address="127.0.0.1:0",
            rest_address="127.0.0.1:0",
            config=fl.server.ServerConfig(num_rounds=3),
            strategy=strategy,
        )
        print(json.dumps({"losses": history.losses_distributed}), flush=True)
    else:
        _, _, transport, address, k = sys.argv
        fl.client.start_client(
            server_address=address, transport=transport, client=AddClient(int(k)).to_client()
        )
        print("NODE DONE", flush=True)
