"""A Flower 1.12 ClientApp/ServerApp, with one change: ``import stamen as fl``."""

import numpy as np

import stamen as fl
from stamen.common import Context, ndarrays_to_parameters
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id: int):
        self.k = float(partition_id + 1)

    def fit(self, parameters, config):  # train on local data
        return [p + self.k for p in parameters], int(self.k), {}

    def evaluate(self, parameters, config):  # evaluate on local data
        loss = float(np.abs(parameters[0] - 2).sum())
        return loss, int(self.k), {"accuracy": 1.0 / (1.0 + loss)}


def client_fn(context: Context):
    partition_id = context.node_config["partition-id"]
    return FlowerClient(int(partition_id)).to_client()


app = fl.client.ClientApp(client_fn=client_fn)


def server_fn(context: Context):
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(3, dtype=np.float32)]),
        evaluate_metrics_aggregation_fn=lambda metrics: {
            "accuracy": sum(n * m["accuracy"] for n, m in metrics) / sum(n for n, _ in metrics)
        },
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=3))


server_app = fl.server.ServerApp(server_fn=server_fn)

if __name__ == "__main__":
    fl.simulation.run_simulation(server_app=server_app, client_app=app, num_supernodes=2)
