"""Pure NumPy aggregation functions shared by the strategies."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ...errors import RunError
from ...typing import NDArrays

__all__ = ["aggregate", "weighted_loss_avg"]


def aggregate(results: Iterable[tuple[NDArrays, int]]) -> NDArrays:
    """Weighted mean of models, by number of examples (FedAvg, McMahan et al. 2017).

    ``w = sum_k n_k * w_k / sum_k n_k``, accumulated in a running float64 sum (one
    model-sized accumulator, whatever the number of results). Floating arrays keep their
    dtype; other dtypes come back as float64.

    Raises:
        RunError: no results, results of different layouts, or a total of 0 examples.
    """
    total = 0
    acc: list[np.ndarray] | None = None
    dtypes: list[np.dtype] = []
    for index, (arrays, num_examples) in enumerate(results):
        if acc is None:
            acc = [np.zeros(a.shape, dtype=np.float64) for a in arrays]
            dtypes = [a.dtype for a in arrays]
        elif len(arrays) != len(acc) or any(
            a.shape != s.shape for a, s in zip(arrays, acc, strict=True)
        ):
            raise RunError(
                f"aggregate: result {index} has layers "
                f"{[a.shape for a in arrays]}, expected {[s.shape for s in acc]}"
            )
        for layer, array in zip(acc, arrays, strict=True):
            layer += np.multiply(array, num_examples, dtype=np.float64)
        total += num_examples
    if acc is None:
        raise RunError("aggregate: expected at least one result, received none")
    if total <= 0:
        raise RunError(
            f"aggregate: the results hold {total} examples in total; cannot weight by it"
        )
    out: NDArrays = []
    for layer, dtype in zip(acc, dtypes, strict=True):
        layer /= total
        out.append(layer.astype(dtype, copy=False) if np.issubdtype(dtype, np.floating) else layer)
    return out


def weighted_loss_avg(results: Iterable[tuple[int, float]]) -> float:
    """Loss averaged by number of examples.

    Raises:
        RunError: no results, or a total of 0 examples.
    """
    pairs = list(results)
    total = sum(n for n, _ in pairs)
    if not pairs or total <= 0:
        raise RunError(f"weighted_loss_avg: expected results with examples, received {pairs!r:.80}")
    return float(sum(n * loss for n, loss in pairs) / total)
