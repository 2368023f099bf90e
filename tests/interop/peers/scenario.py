"""The deterministic federation that every interop test runs.

Pure NumPy and the standard library: it is imported by the Stamen tests (dev venv) and by
the Flower peer scripts (Flower venv) alike, so both sides train exactly the same clients.

Two clients, ids 1 and 2. Client ``k`` returns ``parameters + k`` and reports
``NUM_EXAMPLES[k]`` examples (1 and 3), so FedAvg's weights are 1/4 and 3/4, exact in
binary, and one round adds exactly ``(1 * 1 + 3 * 2) / 4 = 1.75`` to every weight. The model
is two float32 layers of different shapes holding dyadic values, so every sum, product and
mean in the run is exact in float32 and the results can be compared bit for bit.

Evaluation returns ``parameters[0][0, 0] + parameters[1][-1] + k`` as the loss: exact in
float32 (``EvaluateRes.loss`` is a 32-bit float on the wire), and it proves the client saw
the aggregated model of both layers.

Configs and metrics carry one value of every Scalar kind (int, negative sint64 minimum,
uint64 above INT64_MAX, float, str with non-ASCII text, bool, bytes), and clients reject a
config whose values or types differ from what the server must have sent.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

CLIENT_IDS = (1, 2)
NUM_EXAMPLES = {1: 1, 2: 3}
NUM_ROUNDS = 2
LAYER_SHAPES = ((2, 3), (4,))


def initial_ndarrays() -> list[np.ndarray]:
    """The initial global model: two float32 layers of dyadic values."""
    return [
        np.array([[0.5, -1.0, 2.25], [0.0, 3.5, -0.75]], dtype=np.float32),
        np.array([0.125, 0.25, 0.375, 0.5], dtype=np.float32),
    ]


def fit_config(server_round: int) -> dict[str, Any]:
    """The config the server sends with each FitIns (``on_fit_config_fn``)."""
    return {
        "round": server_round,
        "neg": -(2**63),
        "big": 2**64 - 1,
        "lr": -0.375,
        "tag": "fit-\u00fc\u2713",
        "flag": True,
        "blob": b"\x00\xff\x10",
    }


def evaluate_config(server_round: int) -> dict[str, Any]:
    """The config the server sends with each EvaluateIns (``on_evaluate_config_fn``)."""
    return {"round": server_round, "phase": "evaluate", "off": False}


def _check_config(config: dict[str, Any], make: Any) -> int:
    server_round = config.get("round")
    if type(server_round) is not int:
        raise ValueError(f"config 'round': expected an int, received {server_round!r}")
    expected = make(server_round)
    received = {k: (type(v).__name__, v) for k, v in config.items()}
    wanted = {k: (type(v).__name__, v) for k, v in expected.items()}
    if received != wanted:
        raise ValueError(f"config: expected {wanted!r}, received {received!r}")
    return server_round


def _check_layout(parameters: list[np.ndarray]) -> None:
    layout = [(a.dtype.str, a.shape) for a in parameters]
    wanted = [(np.dtype(np.float32).str, shape) for shape in LAYER_SHAPES]
    if layout != wanted:
        raise ValueError(f"parameters: expected layers {wanted}, received {layout}")


def get_parameters(client_id: int) -> list[np.ndarray]:
    """What client ``client_id`` answers to GetParametersIns: the initial model."""
    return initial_ndarrays()


def fit(
    client_id: int, parameters: list[np.ndarray], config: dict[str, Any]
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """Client ``client_id``'s training: ``parameters + client_id``."""
    server_round = _check_config(config, fit_config)
    _check_layout(parameters)
    updated = [layer + np.float32(client_id) for layer in parameters]
    metrics = {
        "client": client_id,
        "round": server_round,
        "name": f"c{client_id}",
        "even": client_id % 2 == 0,
        "raw": bytes([client_id]),
        "scale": 0.5 * client_id,
        "big": 2**64 - client_id,
    }
    return updated, NUM_EXAMPLES[client_id], metrics


def evaluate(
    client_id: int, parameters: list[np.ndarray], config: dict[str, Any]
) -> tuple[float, int, dict[str, Any]]:
    """Client ``client_id``'s evaluation: loss ``p[0][0, 0] + p[1][-1] + client_id``."""
    server_round = _check_config(config, evaluate_config)
    _check_layout(parameters)
    loss = float(parameters[0][0, 0] + parameters[1][-1]) + client_id
    return loss, NUM_EXAMPLES[client_id], {"client": client_id, "round": server_round}


def aggregate_fit_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """``fit_metrics_aggregation_fn``: independent of the order of the results."""
    return {
        "examples": sum(n for n, _ in results),
        "weighted_client": sum(n * m["client"] for n, m in results),
        "round": min(m["round"] for _, m in results),
        "names": ",".join(sorted(m["name"] for _, m in results)),
        "any_even": any(m["even"] for _, m in results),
        "raw": b"".join(sorted(m["raw"] for _, m in results)),
        "scale_sum": sum(m["scale"] for _, m in results),
        "big_max": max(m["big"] for _, m in results),
    }


def aggregate_evaluate_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """``evaluate_metrics_aggregation_fn``: independent of the order of the results."""
    return {
        "examples": sum(n for n, _ in results),
        "weighted_client": sum(n * m["client"] for n, m in results),
        "round": min(m["round"] for _, m in results),
    }


# --- a JSON form that keeps dtypes and scalar types exactly -----------------------------


def encode_ndarray(array: np.ndarray) -> str:
    """``.npy`` bytes (``allow_pickle=False``), base64."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_ndarray(text: str) -> np.ndarray:
    """Inverse of :func:`encode_ndarray`."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def encode_scalar(value: Any) -> list[Any]:
    """``[type name, JSON value]``, so that 1, 1.0 and True stay distinct."""
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if type(value) in (bool, int, float, str):
        return [type(value).__name__, value]
    raise TypeError(f"not a Scalar: {value!r}")


def decode_scalar(item: list[Any]) -> Any:
    """Inverse of :func:`encode_scalar`."""
    kind, value = item
    return bytes.fromhex(value) if kind == "bytes" else value


def encode_metrics(metrics: dict[str, list[tuple[int, Any]]]) -> dict[str, Any]:
    """History metrics (``{name: [(round, scalar)]}``) as JSON."""
    return {k: [[r, encode_scalar(v)] for r, v in vs] for k, vs in metrics.items()}


def decode_metrics(data: dict[str, Any]) -> dict[str, list[tuple[int, Any]]]:
    """Inverse of :func:`encode_metrics`."""
    return {k: [(r, decode_scalar(v)) for r, v in vs] for k, vs in data.items()}
