"""A ClientApp whose node keeps state across rounds in ``context.state``.

``context.state`` is a ``RecordSet`` (Flower 1.12's API) that lives as long as the node:
``client_fn`` builds a new client for every message, and the client finds there what
earlier rounds left. This node keeps its optimizer's momentum (a ``ParametersRecord``) and
counts its rounds and examples (a ``MetricsRecord``).
"""

import numpy as np

import stamen as fl
from stamen.common import Context, MetricsRecord, ParametersRecord, array_from_numpy

from task import gradient, load_partition, mse


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id: int, state):
        self.x, self.y = load_partition(partition_id)
        self.lr = 0.02 / (1 + partition_id) ** 2  # steps fit for this node's feature scale
        self.state = state
        if "progress" not in state.metrics_records:  # the node's first message
            state.metrics_records["progress"] = MetricsRecord({"rounds": 0, "examples": 0})

    def fit(self, parameters, config):
        weights = parameters[0].copy()
        if "momentum" in self.state.parameters_records:
            velocity = self.state.parameters_records["momentum"]["velocity"].numpy()
        else:
            velocity = np.zeros_like(weights)
        for _ in range(int(config["local-steps"])):
            velocity = 0.9 * velocity - self.lr * gradient(weights, self.x, self.y)
            weights = weights + velocity
        self.state.parameters_records["momentum"] = ParametersRecord(
            {"velocity": array_from_numpy(velocity)}
        )
        progress = self.state.metrics_records["progress"]
        progress["rounds"] += 1
        progress["examples"] += len(self.y)
        return [weights], len(self.y), {"rounds": progress["rounds"]}

    def evaluate(self, parameters, config):
        return mse(parameters[0], self.x, self.y), len(self.y), {}


def client_fn(context: Context):
    partition_id = int(context.node_config["partition-id"])
    return FlowerClient(partition_id, context.state).to_client()


app = fl.client.ClientApp(client_fn=client_fn)
