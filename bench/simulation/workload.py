"""The benchmark's workload, for Stamen and for Flower 1.12 alike.

Softmax regression on scikit-learn's digits (the demo's model): ``W`` 64x10 and ``b``
10, one epoch of mini-batch gradient descent per fit. Virtual client ``i`` trains on
``EXAMPLES_PER_CLIENT`` examples drawn with an RNG seeded by ``i`` from the training pool
(partitions overlap: 1,797 digits cannot give 1,000 clients disjoint shares). The data is
read from the ``.npz`` file named by ``$STAMEN_BENCH_DIGITS`` (written by ``run.py``), so
the Flower virtualenv needs no scikit-learn.

``framework()`` is ``stamen`` or ``flwr`` (``$STAMEN_BENCH_FRAMEWORK``); the client code
is the same for both.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from typing import Any

import numpy as np

NUM_FEATURES = 64
NUM_CLASSES = 10
EXAMPLES_PER_CLIENT = 40
TEST_EXAMPLES = 297
FIT_CONFIG = {"lr": 0.5, "batch_size": 10}


def framework() -> Any:
    """``import stamen as fl`` or ``import flwr as fl``, as ``$STAMEN_BENCH_FRAMEWORK`` says."""
    return importlib.import_module(os.environ.get("STAMEN_BENCH_FRAMEWORK", "stamen"))


fl = framework()


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Features in [0, 1] and labels (cached per process, so per Ray worker)."""
    with np.load(os.environ["STAMEN_BENCH_DIGITS"]) as data:
        return data["x"], data["y"]


def partition(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The examples of client ``partition_id``."""
    x, y = digits()
    pool = len(y) - TEST_EXAMPLES
    rows = np.random.default_rng([7, partition_id]).choice(pool, EXAMPLES_PER_CLIENT, replace=False)
    return x[rows], y[rows]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def evaluate_model(
    parameters: list[np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    log_p = _log_softmax(x @ parameters[0] + parameters[1])
    return float(-log_p[np.arange(len(y)), y].mean()), float(np.mean(log_p.argmax(1) == y))


class DigitsClient(fl.client.NumPyClient):
    """Virtual client ``partition_id``."""

    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id

    def get_parameters(self, config):
        return [np.zeros((NUM_FEATURES, NUM_CLASSES)), np.zeros(NUM_CLASSES)]

    def fit(self, parameters, config):
        x, y = partition(self.partition_id)
        weights, bias = np.array(parameters[0]), np.array(parameters[1])
        one_hot = np.eye(NUM_CLASSES)[y]
        order = np.random.default_rng([self.partition_id, int(config["server_round"])])
        order = order.permutation(len(y))
        batch_size, lr = int(config["batch_size"]), float(config["lr"])
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            error = (np.exp(_log_softmax(x[batch] @ weights + bias)) - one_hot[batch]) / len(batch)
            weights -= lr * (x[batch].T @ error)
            bias -= lr * error.sum(axis=0)
        return [weights, bias], len(y), {}

    def evaluate(self, parameters, config):
        x, y = partition(self.partition_id)
        loss, accuracy = evaluate_model(parameters, x, y)
        return loss, len(y), {"accuracy": accuracy}


def client_fn(context) -> Any:
    """Flower 1.12's ``client_fn(context)``."""
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


class TimedFedAvg(fl.server.strategy.FedAvg):
    """FedAvg that notes when round 1 starts (after the backend's start-up) and counts fits."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first_round_at: float | None = None
        self.fit_results = 0
        self.fit_failures = 0

    def configure_fit(self, server_round, parameters, client_manager):
        if self.first_round_at is None:
            self.first_round_at = time.monotonic()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        self.fit_results += len(results)
        self.fit_failures += len(failures)
        return super().aggregate_fit(server_round, results, failures)


def make_strategy(fraction: float, accuracy: dict[int, float]) -> TimedFedAvg:
    """FedAvg sampling ``fraction`` to fit and to evaluate, with centralized accuracy."""
    x, y = digits()

    def evaluate_fn(server_round, parameters, config):
        loss, acc = evaluate_model(parameters, x[-TEST_EXAMPLES:], y[-TEST_EXAMPLES:])
        accuracy[server_round] = acc
        return loss, {"accuracy": acc}

    initial = [np.zeros((NUM_FEATURES, NUM_CLASSES)), np.zeros(NUM_CLASSES)]
    return TimedFedAvg(
        fraction_fit=fraction,
        fraction_evaluate=fraction,
        initial_parameters=fl.common.ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda server_round: {**FIT_CONFIG, "server_round": server_round},
        evaluate_fn=evaluate_fn,
    )
