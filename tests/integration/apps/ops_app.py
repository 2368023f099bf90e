"""Clients for the operator commands' tests (test_operator_commands.py): ``stamen node
--client ops_app:client_fn`` against ``stamen server --strategy ...`` (no ServerApp)."""

import numpy as np

import stamen as fl


class Client(fl.client.NumPyClient):
    def __init__(self, k):
        self.k = k

    def get_parameters(self, config):
        return [np.zeros(3, dtype=np.float32)]

    def fit(self, parameters, config):
        return [parameters[0] + self.k], 10, {"k": self.k}

    def evaluate(self, parameters, config):
        loss = float(np.abs(parameters[0] - 2).sum())
        return loss, 10, {"accuracy": 1.0 / (1.0 + loss)}


def client_fn(context):
    return Client(float(context.node_config.get("k", 1.0))).to_client()


class Broken(fl.client.NumPyClient):
    """Every fit raises: no round aggregates anything, so the run fails."""

    def get_parameters(self, config):
        return [np.zeros(3, dtype=np.float32)]

    def fit(self, parameters, config):
        raise RuntimeError("broken on purpose")


broken = Broken()
