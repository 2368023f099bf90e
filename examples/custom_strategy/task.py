"""The data and the model: linear regression in NumPy on data each node generates itself."""

import numpy as np

TRUE_WEIGHTS = np.array([2.0, -3.0, 0.5, 1.0])


def load_partition(partition_id: int):
    """This node's 200 examples; each node's features have another scale (non-IID)."""
    rng = np.random.default_rng(partition_id)
    x = rng.normal(0.0, 1.0 + partition_id, size=(200, len(TRUE_WEIGHTS)))
    y = x @ TRUE_WEIGHTS + rng.normal(0.0, 0.1, size=200)
    return x, y


def mse(weights, x, y) -> float:
    return float(np.mean((x @ weights - y) ** 2))


def gradient(weights, x, y):
    return 2.0 * x.T @ (x @ weights - y) / len(y)
