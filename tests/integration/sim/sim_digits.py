"""A deterministic simulation workload: softmax regression on scikit-learn's digits.

The demo's model (multinomial logistic regression, ``W`` 64x10 and ``b`` 10) trained by
mini-batch gradient descent, for any number of virtual clients: virtual client ``i`` draws
``EXAMPLES_PER_CLIENT`` examples of the training pool with an RNG seeded by ``i``
(partitions overlap once there are many clients), and builds them when ``client_fn`` is
called, so a client holds no memory between calls. Everything is seeded, so a run gives
the same parameters on every backend.

Ray workers import this module by name: put its directory on their ``PYTHONPATH``
(:func:`ray_init_args`).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import stamen as fl
from stamen.context import Context

NUM_FEATURES = 64
NUM_CLASSES = 10
EXAMPLES_PER_CLIENT = 40
TEST_EXAMPLES = 297
FIT_CONFIG = {"lr": 0.5, "batch_size": 10, "epochs": 1}

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.intp]


@functools.cache
def digits() -> tuple[Floats, Ints]:
    """Features scaled to [0, 1] and labels of the 1,797 digits (cached per process)."""
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    return np.asarray(images, dtype=np.float64) / 16.0, np.asarray(targets, dtype=np.intp)


def held_out() -> tuple[Floats, Ints]:
    """The last ``TEST_EXAMPLES`` digits, never given to a client."""
    x, y = digits()
    return x[-TEST_EXAMPLES:], y[-TEST_EXAMPLES:]


def partition(partition_id: int) -> tuple[Floats, Ints]:
    """The examples of virtual client ``partition_id`` (drawn from the training pool)."""
    x, y = digits()
    pool = len(y) - TEST_EXAMPLES
    rows = np.random.default_rng([7, partition_id]).choice(pool, EXAMPLES_PER_CLIENT, replace=False)
    return x[rows], y[rows]


def initial_parameters() -> list[Floats]:
    """``[W, b]`` of zeros."""
    return [np.zeros((NUM_FEATURES, NUM_CLASSES)), np.zeros(NUM_CLASSES)]


def _log_softmax(logits: Floats) -> Floats:
    shifted = logits - logits.max(axis=1, keepdims=True)
    out: Floats = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def evaluate_model(parameters: list[Any], x: Floats, y: Ints) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    log_p = _log_softmax(x @ parameters[0] + parameters[1])
    return float(-log_p[np.arange(len(y)), y].mean()), float(np.mean(log_p.argmax(1) == y))


def train_model(
    parameters: list[Any], x: Floats, y: Ints, *, lr: float, batch_size: int, seed: list[int]
) -> list[Floats]:
    """One epoch of mini-batch gradient descent in a seeded order."""
    weights, bias = np.array(parameters[0]), np.array(parameters[1])
    one_hot = np.eye(NUM_CLASSES)[y]
    order = np.random.default_rng(seed).permutation(len(y))
    for start in range(0, len(y), batch_size):
        batch = order[start : start + batch_size]
        error = (np.exp(_log_softmax(x[batch] @ weights + bias)) - one_hot[batch]) / len(batch)
        weights -= lr * (x[batch].T @ error)
        bias -= lr * error.sum(axis=0)
    return [weights, bias]


class DigitsClient(fl.client.NumPyClient):
    """Virtual client ``partition_id``; counts its fits in ``context.state``."""

    def __init__(self, partition_id: int, context: Context) -> None:
        self.partition_id = partition_id
        self.state = context.state

    def get_parameters(self, config: dict[str, Any]) -> list[Floats]:
        """Zeros."""
        return initial_parameters()

    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Floats], int, dict[str, Any]]:
        """Train one epoch on the partition."""
        x, y = partition(self.partition_id)
        record = self.state.metrics_records.setdefault("fits", fl.common.MetricsRecord())
        record["count"] = int(record.get("count", 0)) + 1
        trained = train_model(
            parameters,
            x,
            y,
            lr=float(config["lr"]),
            batch_size=int(config["batch_size"]),
            seed=[self.partition_id, int(config["server_round"])],
        )
        return trained, len(y), {"fits": record["count"], "pid": os.getpid()}

    def evaluate(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Loss and accuracy on the partition."""
        x, y = partition(self.partition_id)
        loss, accuracy = evaluate_model(parameters, x, y)
        return loss, len(y), {"accuracy": accuracy}


def client_fn(context: Context) -> fl.client.Client:
    """Build the client of the node's partition."""
    return DigitsClient(int(context.node_config["partition-id"]), context).to_client()


class FaultyClient(fl.client.NumPyClient):
    """Partition 1 hangs (60 s), 2 raises, 3 exits its process; the others train."""

    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id

    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Any], int, dict[str, Any]]:
        """Misbehave as the partition says, or return the parameters plus one."""
        if self.partition_id == 1:
            threading.Event().wait(60)  # hangs past any round_timeout of the tests
        elif self.partition_id == 2:
            raise ValueError("partition 2 fails on purpose")
        elif self.partition_id == 3:
            sys.exit(1)
        return [p + 1 for p in parameters], 1, {"pid": os.getpid()}


def faulty_client_fn(context: Context) -> fl.client.Client:
    """Build the FaultyClient of the node's partition."""
    return FaultyClient(int(context.node_config["partition-id"])).to_client()


def fit_metrics(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Aggregate fit metrics: how many clients fitted, the most fits any of them has done
    (state kept across rounds), and how many ran in this process (not in Ray workers)."""
    if not metrics:
        return {}
    return {
        "clients": len(metrics),
        "max_fits": max(int(m["fits"]) for _, m in metrics),
        "in_driver": sum(1 for _, m in metrics if m["pid"] == os.getpid()),
    }


class FinalParameters:
    """Centralized evaluation that keeps the latest global model and its accuracy."""

    def __init__(self) -> None:
        self.parameters: list[Any] = []
        self.accuracy: dict[int, float] = {}

    def __call__(
        self, server_round: int, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        """Evaluate on the test set; remember the parameters."""
        self.parameters = [np.array(p) for p in parameters]
        loss, accuracy = evaluate_model(parameters, *held_out())
        self.accuracy[server_round] = accuracy
        return loss, {"accuracy": accuracy}


def strategy(
    final: FinalParameters, *, fraction: float = 0.1, **kwargs: Any
) -> fl.server.strategy.FedAvg:
    """FedAvg sampling ``fraction`` of the clients to fit and to evaluate."""
    return fl.server.strategy.FedAvg(
        fraction_fit=fraction,
        fraction_evaluate=fraction,
        initial_parameters=fl.common.ndarrays_to_parameters(initial_parameters()),
        on_fit_config_fn=lambda server_round: {**FIT_CONFIG, "server_round": server_round},
        evaluate_fn=final,
        fit_metrics_aggregation_fn=fit_metrics,
        **kwargs,
    )


def ray_init_args() -> dict[str, Any]:
    """Local Ray whose workers can import this module."""
    return {
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
        "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}},
    }
