"""The ServerApp: FedAvg; the fit metrics say how many rounds each node has counted."""

import numpy as np

import stamen as fl
from stamen.common import Context, ndarrays_to_parameters
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg


def rounds_counted(metrics):
    """The smallest and largest round count the nodes keep in their state."""
    counts = [m["rounds"] for _, m in metrics]
    return {"min_rounds": min(counts), "max_rounds": max(counts)}


def server_fn(context: Context):
    num_nodes = int(context.run_config.get("num-nodes", 3))
    strategy = FedAvg(
        min_fit_clients=num_nodes,
        min_evaluate_clients=num_nodes,
        min_available_clients=num_nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros(4)]),
        on_fit_config_fn=lambda server_round: {"local-steps": 5},
        fit_metrics_aggregation_fn=rounds_counted,
    )
    config = ServerConfig(num_rounds=int(context.run_config.get("num-server-rounds", 5)))
    return ServerAppComponents(strategy=strategy, config=config)


app = fl.server.ServerApp(server_fn=server_fn)
