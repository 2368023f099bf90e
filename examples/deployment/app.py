"""The apps the server and the nodes run: linear regression in NumPy, trained with FedAvg."""

import numpy as np

import stamen as fl
from stamen.common import Context, ndarrays_to_parameters
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg

TRUE_WEIGHTS = np.array([2.0, -3.0, 0.5, 1.0])


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id: int):
        rng = np.random.default_rng(partition_id)  # stands for this machine's own data
        self.x = rng.normal(size=(200, 4))
        self.y = self.x @ TRUE_WEIGHTS + rng.normal(0.0, 0.1, size=200)

    def fit(self, parameters, config):
        weights = parameters[0]
        for _ in range(10):
            weights = weights - 0.1 * 2 * self.x.T @ (self.x @ weights - self.y) / len(self.y)
        return [weights], len(self.y), {}

    def evaluate(self, parameters, config):
        loss = float(np.mean((self.x @ parameters[0] - self.y) ** 2))
        return loss, len(self.y), {}


def client_fn(context: Context):
    return FlowerClient(int(context.node_config["partition-id"])).to_client()


client_app = fl.client.ClientApp(client_fn=client_fn)


def server_fn(context: Context):
    num_nodes = int(context.run_config.get("num-nodes", 2))
    strategy = FedAvg(
        min_fit_clients=num_nodes,
        min_evaluate_clients=num_nodes,
        min_available_clients=num_nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros(4)]),
    )
    config = ServerConfig(num_rounds=int(context.run_config.get("num-server-rounds", 3)))
    return ServerAppComponents(strategy=strategy, config=config)


server_app = fl.server.ServerApp(server_fn=server_fn)
