"""A deterministic six-client federation for runs that mix Stamen and Flower nodes.

Pure NumPy: imported by the Stamen tests (dev venv) and by the Flower peer scripts (Flower
venv) alike. Client ``k`` (1-6) returns ``parameters + k`` with one example, so FedAvg adds
exactly 3.5 to every weight each round; the model is ``scenario``'s dyadic float32 layers,
so every result is exact and runs compare bit for bit whatever order replies arrive in.
Evaluation returns ``p[0][0, 0] + p[1][-1] + k`` as the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # the Flower peers import this module from their own folder
    from . import scenario
except ImportError:  # pragma: no cover - run as a script's sibling
    import scenario  # type: ignore[no-redef]

CLIENT_IDS = (1, 2, 3, 4, 5, 6)
NUM_ROUNDS = 2


def initial_ndarrays() -> list[np.ndarray]:
    """The initial global model (``scenario``'s)."""
    return scenario.initial_ndarrays()


def fit_config(server_round: int) -> dict[str, Any]:
    """The config of each FitIns: every Scalar kind (``scenario``'s)."""
    return scenario.fit_config(server_round)


def evaluate_config(server_round: int) -> dict[str, Any]:
    """The config of each EvaluateIns (``scenario``'s)."""
    return scenario.evaluate_config(server_round)


def _check(config: dict[str, Any], make: Any, parameters: list[np.ndarray]) -> None:
    expected = make(config.get("round"))
    received = {k: (type(v).__name__, v) for k, v in config.items()}
    wanted = {k: (type(v).__name__, v) for k, v in expected.items()}
    if received != wanted:
        raise ValueError(f"config: expected {wanted!r}, received {received!r}")
    layout = [(a.dtype.str, a.shape) for a in parameters]
    if layout != [(np.dtype(np.float32).str, shape) for shape in scenario.LAYER_SHAPES]:
        raise ValueError(f"parameters: unexpected layers {layout}")


def fit(
    client_id: int, parameters: list[np.ndarray], config: dict[str, Any]
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """``parameters + client_id``, one example."""
    _check(config, fit_config, parameters)
    return [layer + np.float32(client_id) for layer in parameters], 1, {"client": client_id}


def evaluate(
    client_id: int, parameters: list[np.ndarray], config: dict[str, Any]
) -> tuple[float, int, dict[str, Any]]:
    """Loss ``p[0][0, 0] + p[1][-1] + client_id``, one example."""
    _check(config, evaluate_config, parameters)
    loss = float(parameters[0][0, 0] + parameters[1][-1]) + client_id
    return loss, 1, {"client": client_id}
