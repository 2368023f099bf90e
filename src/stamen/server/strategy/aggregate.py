"""Pure NumPy aggregation functions shared by the strategies.

Every function takes decoded models (lists of arrays) and returns a model whose layers
keep the dtypes of the input layers: the arithmetic runs in float64 (complex128 for complex
layers) and the result is cast back once, integer and boolean layers after rounding to the
nearest value. So a model's layout never drifts from round to round.

Memory: :func:`aggregate` (and :class:`WeightedSum` under it) consumes its results one at a
time into one float64 accumulator, so it holds one model however many results there are.
The robust rules (:func:`aggregate_median`, :func:`aggregate_trimmed_avg`,
:func:`aggregate_krum`, :func:`aggregate_bulyan`) need all the models at once.

The names and arguments are Flower 1.12's (``flwr.server.strategy.aggregate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ...errors import ConfigError, RunError
from ...typing import NDArray, NDArrays

__all__ = [
    "WeightedSum",
    "aggregate",
    "aggregate_bulyan",
    "aggregate_krum",
    "aggregate_median",
    "aggregate_qffl",
    "aggregate_trimmed_avg",
    "cast_like",
    "check_bulyan_rule",
    "krum_scores",
    "pairwise_squared_distances",
    "weighted_loss_avg",
]


def _work_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype arithmetic on a layer of ``dtype`` runs in: float64 or wider."""
    return np.result_type(dtype, np.float64)


def cast_like(array: NDArray, dtype: np.dtype[Any]) -> NDArray:
    """Cast a float64 result back to a layer's ``dtype``, rounding for ints and bools."""
    if array.dtype == dtype:
        return array
    if np.issubdtype(dtype, np.inexact):
        return array.astype(dtype)
    return np.rint(array).astype(dtype)


class WeightedSum:
    """A running weighted sum of models: one accumulator, whatever the number of models.

    ``add(w_k, n_k)`` for each model, then :meth:`mean` returns ``sum_k n_k w_k / sum_k n_k``
    (:meth:`sum` the raw ``sum_k n_k w_k``), in the dtypes of the first model.
    """

    def __init__(self) -> None:
        self._acc: list[NDArray] | None = None
        self._dtypes: list[np.dtype[Any]] = []
        self.total_weight: float = 0
        self.count = 0

    def add(self, arrays: NDArrays, weight: float = 1) -> None:
        """Add ``weight * arrays``.

        Raises:
            RunError: ``arrays`` does not have the layers of the first model added.
        """
        if self._acc is None:
            self._acc = [np.zeros(a.shape, dtype=_work_dtype(a.dtype)) for a in arrays]
            self._dtypes = [a.dtype for a in arrays]
        elif len(arrays) != len(self._acc) or any(
            a.shape != s.shape for a, s in zip(arrays, self._acc, strict=True)
        ):
            raise RunError(
                f"aggregate: result {self.count} has layers {[a.shape for a in arrays]}, "
                f"expected {[s.shape for s in self._acc]}"
            )
        for layer, array in zip(self._acc, arrays, strict=True):
            layer += np.multiply(array, weight, dtype=layer.dtype)
        self.total_weight += weight
        self.count += 1

    def sum(self) -> NDArrays:
        """``sum_k n_k w_k`` in float64 (complex128 for complex layers).

        Raises:
            RunError: nothing was added.
        """
        if self._acc is None:
            raise RunError("aggregate: expected at least one result, received none")
        return [layer.copy() for layer in self._acc]

    def mean(self) -> NDArrays:
        """``sum_k n_k w_k / sum_k n_k``, in the dtypes of the first model.

        Raises:
            RunError: nothing was added, or the weights add up to 0 or less.
        """
        if self._acc is None:
            raise RunError("aggregate: expected at least one result, received none")
        if self.total_weight <= 0:
            raise RunError(
                f"aggregate: the results hold {self.total_weight} examples in total; "
                "cannot weight by it"
            )
        return [
            cast_like(layer / self.total_weight, dtype)
            for layer, dtype in zip(self._acc, self._dtypes, strict=True)
        ]


def aggregate(results: Iterable[tuple[NDArrays, int]]) -> NDArrays:
    """Weighted mean of models, by number of examples (FedAvg, McMahan et al. 2017).

    ``w = sum_k n_k * w_k / sum_k n_k``, accumulated in a running float64 sum, so that
    ``results`` may be a generator: one model-sized accumulator, whatever their number.

    Raises:
        RunError: no results, results of different layouts, or a total of 0 examples.
    """
    acc = WeightedSum()
    for arrays, num_examples in results:
        acc.add(arrays, num_examples)
    return acc.mean()


def weighted_loss_avg(results: Iterable[tuple[int, float]]) -> float:
    """Loss averaged by number of examples: ``sum_k n_k l_k / sum_k n_k``.

    Raises:
        RunError: no results, or a total of 0 examples.
    """
    pairs = list(results)
    total = sum(n for n, _ in pairs)
    if not pairs or total <= 0:
        raise RunError(f"weighted_loss_avg: expected results with examples, received {pairs!r:.80}")
    return float(sum(n * loss for n, loss in pairs) / total)


def _models(results: Sequence[tuple[NDArrays, int]], rule: str) -> list[NDArrays]:
    if not results:
        raise RunError(f"{rule}: expected at least one result, received none")
    models = [arrays for arrays, _ in results]
    shapes = [a.shape for a in models[0]]
    for index, arrays in enumerate(models):
        if [a.shape for a in arrays] != shapes:
            raise RunError(
                f"{rule}: result {index} has layers {[a.shape for a in arrays]}, expected {shapes}"
            )
    return models


def _stack(models: list[NDArrays], layer: int) -> NDArray:
    """Layer ``layer`` of every model, stacked on a new axis 0, in float64."""
    dtype = _work_dtype(models[0][layer].dtype)
    return np.stack([np.asarray(m[layer], dtype=dtype) for m in models])


def aggregate_median(results: Sequence[tuple[NDArrays, int]]) -> NDArrays:
    """Coordinate-wise median of the models; the numbers of examples are ignored.

    Raises:
        RunError: no results, or results of different layouts.
    """
    models = _models(results, "aggregate_median")
    return [
        cast_like(np.median(_stack(models, layer), axis=0), models[0][layer].dtype)
        for layer in range(len(models[0]))
    ]


def aggregate_trimmed_avg(
    results: Sequence[tuple[NDArrays, int]], proportiontocut: float
) -> NDArrays:
    """Coordinate-wise trimmed mean: drop the ``int(beta * K)`` lowest and highest values.

    With ``K`` results and ``c = int(proportiontocut * K)``, each coordinate is the mean of
    its values ranked ``c .. K - c - 1``. The numbers of examples are ignored.

    Raises:
        ConfigError: ``proportiontocut`` is not in [0, 0.5).
        RunError: no results, or results of different layouts.
    """
    if not 0 <= proportiontocut < 0.5:
        raise ConfigError(
            f"aggregate_trimmed_avg: proportiontocut must be in [0, 0.5), "
            f"received {proportiontocut!r}"
        )
    models = _models(results, "aggregate_trimmed_avg")
    cut = int(proportiontocut * len(models))
    trimmed: NDArrays = []
    for layer in range(len(models[0])):
        ranked = np.sort(_stack(models, layer), axis=0)
        kept = ranked[cut : len(models) - cut]
        trimmed.append(cast_like(kept.mean(axis=0), models[0][layer].dtype))
    return trimmed


def pairwise_squared_distances(models: Sequence[NDArrays]) -> NDArray:
    """``D[i, j] = ||w_i - w_j||^2`` over all layers, in float64."""
    count = len(models)
    distances = np.zeros((count, count))
    for layer in range(len(models[0]) if models else 0):
        flat = _stack(list(models), layer).reshape(count, -1)
        for i in range(count):
            diff = np.abs(flat - flat[i])
            distances[i] += np.sum(diff * diff, axis=1)
    return distances


def krum_scores(distances: NDArray, num_malicious: int) -> NDArray:
    """Krum score of each model: the sum of its ``max(1, K - f - 2)`` smallest distances.

    ``K`` is the number of models and ``f = num_malicious``; a model's distance to itself
    (0) is not counted.
    """
    num_closest = max(1, len(distances) - num_malicious - 2)
    return np.array([np.sort(row)[1 : num_closest + 1].sum() for row in distances])


def aggregate_krum(
    results: Sequence[tuple[NDArrays, int]], num_malicious: int, to_keep: int = 0
) -> NDArrays:
    """Krum (Blanchard et al. 2017), or multi-Krum when ``to_keep > 0``.

    Krum returns the model with the lowest :func:`krum_scores` (the first on a tie).
    Multi-Krum averages, weighted by number of examples, the ``to_keep`` models with the
    lowest scores (all models if ``to_keep`` exceeds their number).

    Raises:
        ConfigError: ``num_malicious`` or ``to_keep`` is negative.
        RunError: no results, or results of different layouts.
    """
    if num_malicious < 0 or to_keep < 0:
        raise ConfigError(
            f"aggregate_krum: num_malicious and to_keep must be >= 0, received "
            f"{num_malicious!r} and {to_keep!r}"
        )
    models = _models(results, "aggregate_krum")
    scores = krum_scores(pairwise_squared_distances(models), num_malicious)
    if to_keep > 0:
        best = sorted(np.argsort(scores, kind="stable")[:to_keep].tolist())
        return aggregate(results[i] for i in best)
    return models[int(np.argmin(scores))]


def aggregate_bulyan(
    results: Sequence[tuple[NDArrays, int]],
    num_malicious: int,
    aggregation_rule: Callable[..., NDArrays] = aggregate_krum,
    **aggregation_rule_kwargs: Any,
) -> NDArrays:
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    With ``K`` results and ``f = num_malicious`` (``K >= 4f + 3``): Krum picks a model,
    which leaves the candidates, ``theta = K - 2f`` times; then each coordinate is the mean
    of the ``beta = theta - 2f`` selected values closest to the selected models'
    coordinate-wise median. The numbers of examples are ignored.

    Raises:
        ConfigError: the first rule is not single-model Krum (the only Byzantine-resilient
            rule that returns one of its inputs), or ``num_malicious < 0``.
        RunError: fewer than ``4f + 3`` results, or results of different layouts.
    """
    check_bulyan_rule(aggregation_rule, aggregation_rule_kwargs)
    if num_malicious < 0:
        raise ConfigError(f"aggregate_bulyan: num_malicious must be >= 0, received {num_malicious}")
    models = _models(results, "aggregate_bulyan")
    if len(models) < 4 * num_malicious + 3:
        raise RunError(
            f"aggregate_bulyan: needs at least 4 * num_malicious + 3 = {4 * num_malicious + 3} "
            f"results, received {len(models)}"
        )
    theta = len(models) - 2 * num_malicious
    beta = theta - 2 * num_malicious
    distances = pairwise_squared_distances(models)
    candidates = list(range(len(models)))
    selected: list[NDArrays] = []
    for _ in range(theta):
        scores = krum_scores(distances[np.ix_(candidates, candidates)], num_malicious)
        selected.append(models[candidates.pop(int(np.argmin(scores)))])
    out: NDArrays = []
    for layer in range(len(models[0])):
        stacked = _stack(selected, layer)
        median = np.median(stacked, axis=0)
        closest = np.argsort(np.abs(stacked - median), axis=0, kind="stable")[:beta]
        mean = np.take_along_axis(stacked, closest, axis=0).mean(axis=0)
        out.append(cast_like(mean, models[0][layer].dtype))
    return out


def check_bulyan_rule(rule: Callable[..., NDArrays], kwargs: dict[str, Any]) -> None:
    """Raise ConfigError unless ``rule(**kwargs)`` is single-model Krum."""
    if rule is not aggregate_krum:
        raise ConfigError(
            "Bulyan: first_aggregation_rule must be aggregate_krum (the only rule that "
            f"selects one of the models), received {getattr(rule, '__name__', rule)!r}"
        )
    unknown = set(kwargs) - {"to_keep"}
    if unknown or kwargs.get("to_keep", 0) != 0:
        raise ConfigError(
            "Bulyan: aggregation_rule_kwargs may only hold to_keep=0 (multi-Krum averages "
            f"models instead of selecting one), received {kwargs!r}"
        )


def aggregate_qffl(
    parameters: NDArrays, deltas: Iterable[NDArrays], hs_fll: Iterable[float]
) -> NDArrays:
    """q-FFL step (Li et al. 2020): ``w - sum_k Delta_k / sum_k h_k``.

    ``deltas`` is consumed one at a time (one accumulator), then ``hs_fll`` is summed.

    Raises:
        RunError: no deltas, deltas of another layout than ``parameters``, or
            ``sum_k h_k`` is not positive.
    """
    acc = WeightedSum()
    for delta in deltas:
        acc.add(delta)
    total = acc.sum()
    denominator = float(sum(hs_fll))
    if not denominator > 0:
        raise RunError(f"aggregate_qffl: sum of h_k must be > 0, received {denominator!r}")
    if [a.shape for a in total] != [p.shape for p in parameters]:
        raise RunError(
            f"aggregate_qffl: deltas have layers {[a.shape for a in total]}, expected "
            f"{[p.shape for p in parameters]}"
        )
    return [
        cast_like(np.asarray(p, dtype=s.dtype) - s / denominator, p.dtype)
        for p, s in zip(parameters, total, strict=True)
    ]
