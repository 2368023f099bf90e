"""A Flower 1.12 simulation script as a Flower user writes it; only the import changed.

Usage: ``python sim_flower_script.py [context|legacy]``. Prints ``LOSSES [...]`` and
``ROUNDS n``. Every number is exact in binary floating point, so Flower and Stamen print
the same line whatever the order in which the clients answer (8 clients of 1 example each:
FedAvg's weights are 1/8, exact in binary).
"""

import sys

import numpy as np

import stamen as fl

NUM_CLIENTS = 8


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id):
        self.partition_id = partition_id

    def get_parameters(self, config):
        return [np.zeros(4)]

    def fit(self, parameters, config):
        return [parameters[0] + self.partition_id], 1, {"partition_id": self.partition_id}

    def evaluate(self, parameters, config):
        loss = float(np.abs(parameters[0]).sum())
        return loss, 1, {"accuracy": 1.0 / (1.0 + loss)}


def client_fn(context: fl.common.Context) -> fl.client.Client:
    partition_id = int(context.node_config["partition-id"])
    return FlowerClient(partition_id).to_client()


def legacy_client_fn(cid: str) -> fl.client.Client:
    return FlowerClient(int(cid)).to_client()


def weighted_average(metrics):
    examples = [num_examples for num_examples, _ in metrics]
    accuracies = [num_examples * m["accuracy"] for num_examples, m in metrics]
    return {"accuracy": sum(accuracies) / sum(examples)}


def fit_config(server_round):
    return {"server_round": server_round}


if __name__ == "__main__":
    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.5,
        min_fit_clients=NUM_CLIENTS,
        min_evaluate_clients=4,
        min_available_clients=NUM_CLIENTS,
        on_fit_config_fn=fit_config,
        evaluate_metrics_aggregation_fn=weighted_average,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(4)]),
    )
    history = fl.simulation.start_simulation(
        client_fn=legacy_client_fn if sys.argv[1:] == ["legacy"] else client_fn,
        num_clients=NUM_CLIENTS,
        config=fl.server.ServerConfig(num_rounds=3),
        strategy=strategy,
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
    )
    print("LOSSES", history.losses_distributed, flush=True)
    print("ROUNDS", len(history.metrics_distributed["accuracy"]), flush=True)
