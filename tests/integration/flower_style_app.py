"""A Flower quickstart, as a Flower user writes it, with one change: ``import stamen as fl``.

Usage: flower_style_app.py server ADDRESS | flower_style_app.py client ADDRESS K
"""

import sys

import numpy as np

import stamen as fl


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, k):
        self.k = k

    def get_parameters(self, config):
        return [np.zeros((3, 2), dtype=np.float32), np.zeros(2, dtype=np.float32)]

    def fit(self, parameters, config):
        lr = config["lr"]
        return [p + lr * self.k for p in parameters], int(self.k), {"k": self.k}

    def evaluate(self, parameters, config):
        loss = float(np.abs(parameters[1]).sum())
        return loss, int(self.k), {"accuracy": 1.0 / (1.0 + loss)}


def weighted_average(metrics):
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / total}


def fit_config(server_round):
    return {"lr": 0.5, "round": server_round}


if __name__ == "__main__":
    role, address = sys.argv[1], sys.argv[2]
    if role == "server":
        strategy = fl.server.strategy.FedAvg(
            on_fit_config_fn=fit_config,
            evaluate_metrics_aggregation_fn=weighted_average,
        )
        history = fl.server.start_server(
            server_address=address,
            config=fl.server.ServerConfig(num_rounds=3),
            strategy=strategy,
        )
        print("LOSSES", history.losses_distributed, flush=True)
        print("ACCURACY", history.metrics_distributed["accuracy"][-1][1], flush=True)
    else:
        fl.client.start_client(
            server_address=address, client=FlowerClient(float(sys.argv[3])).to_client()
        )
        print("CLIENT DONE", flush=True)
