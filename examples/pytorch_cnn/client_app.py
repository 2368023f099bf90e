"""The ClientApp: each node trains the CNN on its own images, on the CPU."""

import torch

import stamen as fl
from stamen.common import Context

from task import Net, get_weights, load_partition, set_weights, test, train


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.net = Net()

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        loss = train(self.net, self.x, self.y, epochs=int(config["local-epochs"]))
        return get_weights(self.net), len(self.y), {"train_loss": loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.x, self.y)
        return loss, len(self.y), {"accuracy": accuracy}


def client_fn(context: Context):
    torch.manual_seed(int(context.node_config["partition-id"]))  # reproducible batches
    x, y = load_partition(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    return FlowerClient(x, y).to_client()


app = fl.client.ClientApp(client_fn=client_fn)
