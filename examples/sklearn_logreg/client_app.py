"""The ClientApp: each node trains the logistic regression on its own part of the digits."""

import stamen as fl
from stamen.common import Context

from task import get_weights, load_partition, new_model, set_weights, test, train


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.model = new_model()

    def fit(self, parameters, config):
        set_weights(self.model, parameters)
        train(self.model, self.x, self.y, epochs=int(config["local-epochs"]))
        return get_weights(self.model), len(self.y), {}

    def evaluate(self, parameters, config):
        set_weights(self.model, parameters)
        loss, accuracy = test(self.model, self.x, self.y)
        return loss, len(self.y), {"accuracy": accuracy}


def client_fn(context: Context):
    x, y = load_partition(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    return FlowerClient(x, y).to_client()


app = fl.client.ClientApp(client_fn=client_fn)
