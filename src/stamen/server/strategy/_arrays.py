"""Helpers for strategies that keep models as state (float64 copies, layout checks)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ...errors import ConfigError, DecodeError, RunError
from ...messages import Parameters
from ...ndarrays import parameters_to_ndarrays
from ...typing import NDArrays
from .aggregate import cast_like
from .state import StrategyState

__all__ = [
    "arrays_of",
    "as_work",
    "cast_all",
    "check_same_layout",
    "decode_model",
    "dtypes_of_state",
    "load_arrays",
    "step_dtypes",
]


def arrays_of(values: Iterable[Any]) -> NDArrays:
    """``values`` as arrays: NumPy arithmetic on 0-d arrays gives scalars, which have no
    ``.npy`` encoding and no place in a model's layers."""
    return [np.asarray(value) for value in values]


def as_work(ndarrays: NDArrays) -> NDArrays:
    """Copies of ``ndarrays`` in float64 (complex128 for complex layers)."""
    return [np.array(a, dtype=np.result_type(a.dtype, np.float64)) for a in ndarrays]


def cast_all(ndarrays: NDArrays, like: NDArrays) -> NDArrays:
    """``ndarrays`` cast to the dtypes of ``like``, layer by layer."""
    return arrays_of(cast_like(np.asarray(a), b.dtype) for a, b in zip(ndarrays, like, strict=True))


def check_same_layout(what: str, got: NDArrays, expected: NDArrays) -> None:
    """Raise RunError unless ``got`` has the shapes of ``expected``."""
    if [a.shape for a in got] != [a.shape for a in expected]:
        raise RunError(
            f"{what}: the aggregate has layers {[a.shape for a in got]}, but the strategy's "
            f"model has {[a.shape for a in expected]}"
        )


def decode_model(name: str, parameters: Parameters) -> NDArrays:
    """Decode a model given as an argument; ConfigError if it is not NumPy ``.npy``."""
    try:
        return parameters_to_ndarrays(parameters)
    except DecodeError as exc:
        raise ConfigError(f"{name}: expected NumPy parameters: {exc}") from exc


def load_arrays(owner: str, state: StrategyState, name: str) -> NDArrays | None:
    """A float64 copy of ``state.arrays[name]``, or None if absent."""
    arrays = state.arrays.get(name)
    if arrays is None:
        return None
    for array in arrays:
        if not np.issubdtype(array.dtype, np.number):
            raise ConfigError(
                f"{owner}.load_state_dict: {name} must hold numeric arrays, received {array.dtype}"
            )
    return as_work(arrays)


def step_dtypes(model: list[np.dtype[Any]] | None, aggregated: NDArrays) -> list[np.dtype[Any]]:
    """The dtypes of a server optimizer's new model ``x_t + step(aggregate - x_t)``.

    As in Flower's arithmetic: the model's dtype promoted with the aggregate's, and float64
    for integer or boolean results (the step multiplies by float learning rates).
    ``model`` None (unknown): the aggregate's dtypes take its place.
    """
    base = [a.dtype for a in aggregated] if model is None else model
    out: list[np.dtype[Any]] = []
    for dtype, array in zip(base, aggregated, strict=True):
        promoted: np.dtype[Any] = np.result_type(dtype, array.dtype)
        out.append(promoted if promoted.kind in "fc" else np.dtype(np.float64))
    return out


def dtypes_of_state(owner: str, state: StrategyState) -> list[np.dtype[Any]] | None:
    """The model dtypes saved in ``state.values["model_dtypes"]``, or None if absent."""
    names = state.values.get("model_dtypes")
    if names is None:
        return None
    try:
        if not isinstance(names, list):
            raise TypeError(names)
        return [np.dtype(str(name)) for name in names]
    except TypeError as exc:
        raise ConfigError(
            f"{owner}.load_state_dict: model_dtypes must be a list of dtype names, "
            f"received {names!r}"
        ) from exc
