"""A ClientApp and a ServerApp written for Flower 1.12, with one change: ``import stamen as fl``.

Used by test_app_processes.py: ``stamen server flower_app_api:server_app`` and
``stamen node flower_app_api:app`` (run from this directory), and ``run_simulation``.
"""

import numpy as np

import stamen as fl
from stamen.common import Context, Message, MessageType, ndarrays_to_parameters
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id, state):
        self.k = float(partition_id + 1)
        self.state = state

    def fit(self, parameters, config):
        metrics = self.state.metrics_records.setdefault("fits", fl.common.MetricsRecord())
        metrics["n"] = int(metrics.get("n", 0)) + 1
        return [p + self.k * config["lr"] for p in parameters], int(self.k), {"n": metrics["n"]}

    def evaluate(self, parameters, config):
        loss = float(np.abs(parameters[0]).sum())
        return loss, int(self.k), {"accuracy": 1.0 / (1.0 + loss)}


def client_fn(context: Context):
    partition_id = context.node_config["partition-id"]
    return FlowerClient(int(partition_id), context.state).to_client()


def cap_mod(msg: Message, context: Context, call_next) -> Message:
    """Caps every parameter of a fit result at 10 (a mod changing what the server gets)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN:
        record = reply.content.parameters_records["fitres.parameters"]
        for name, array in list(record.items()):
            record[name] = fl.common.array_from_numpy(np.minimum(array.numpy(), 10.0))
    return reply


app = fl.client.ClientApp(client_fn=client_fn, mods=[cap_mod])


def weighted_average(metrics):
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / total}


def server_fn(context: Context):
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(3, dtype=np.float32)]),
        on_fit_config_fn=lambda server_round: {"lr": 2.0},
        evaluate_metrics_aggregation_fn=weighted_average,
        fit_metrics_aggregation_fn=lambda metrics: {"fits": max(m["n"] for _, m in metrics)},
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=4))


server_app = fl.server.ServerApp(server_fn=server_fn)
