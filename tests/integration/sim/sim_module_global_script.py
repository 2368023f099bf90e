"""A Flower 1.12 simulation script that keeps its model in a module global, as Flower's
examples do (``net = Net()`` at module level; each client's ``fit`` loads the global model
into it, trains it, and returns its weights).

Usage: ``python sim_module_global_script.py [backend]``; with ``SIM_FRAMEWORK=flwr`` it
imports Flower instead of Stamen (the bench runs it under both). Prints ``LOSSES [...]``
(the distributed losses, with every digit).

On Flower each virtual client runs on a Ray actor, one at a time per actor, so two
clients never train the shared model at once. Run on threads of one process, they would:
the training step below releases the GIL (as a PyTorch kernel or a data loader does), so
another client's step lands in the same model in between.
"""

import os
import sys
import time

import numpy as np

if os.environ.get("SIM_FRAMEWORK") == "flwr":
    import flwr as fl
else:
    import stamen as fl

NUM_CLIENTS = 6
NUM_ROUNDS = 3
STEPS = 5
LEARNING_RATE = 0.1

_rng = np.random.default_rng(7)
FEATURES = _rng.normal(size=(NUM_CLIENTS, 16, 3))
TARGETS = FEATURES @ np.array([1.0, -2.0, 0.5]) + np.arange(NUM_CLIENTS)[:, None] * 0.1

MODEL = {"weights": np.zeros(3)}  # the module-level model every client of a process uses


def set_parameters(parameters):
    MODEL["weights"] = np.array(parameters[0])


def train(partition_id):
    x, y = FEATURES[partition_id], TARGETS[partition_id]
    for _ in range(STEPS):
        gradient = x.T @ (x @ MODEL["weights"] - y) / len(y)
        time.sleep(0.002)  # the GIL is released here (a GPU kernel, a data loader)
        MODEL["weights"] = MODEL["weights"] - LEARNING_RATE * gradient  # the optimizer's step


def test_loss(partition_id):
    x, y = FEATURES[partition_id], TARGETS[partition_id]
    return float(np.mean((x @ MODEL["weights"] - y) ** 2))


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id):
        self.partition_id = partition_id

    def get_parameters(self, config):
        return [MODEL["weights"].copy()]

    def fit(self, parameters, config):
        set_parameters(parameters)
        train(self.partition_id)
        return [MODEL["weights"].copy()], len(TARGETS[self.partition_id]), {}

    def evaluate(self, parameters, config):
        set_parameters(parameters)
        time.sleep(0.002)
        return test_loss(self.partition_id), len(TARGETS[self.partition_id]), {}


def client_fn(context):
    return FlowerClient(int(context.node_config["partition-id"])).to_client()


if __name__ == "__main__":
    extra = {"backend": sys.argv[1]} if sys.argv[1:] else {}
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=NUM_CLIENTS,
        config=fl.server.ServerConfig(num_rounds=NUM_ROUNDS),
        strategy=fl.server.strategy.FedAvg(
            min_fit_clients=NUM_CLIENTS,
            min_evaluate_clients=NUM_CLIENTS,
            min_available_clients=NUM_CLIENTS,
            initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(3)]),
        ),
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        **extra,
    )
    print("LOSSES", [(r, repr(loss)) for r, loss in history.losses_distributed], flush=True)
