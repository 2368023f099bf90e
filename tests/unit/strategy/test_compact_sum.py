"""WeightedSum(compact=True): float32 layers as a running mean in their own dtype."""

from __future__ import annotations

import numpy as np
import pytest

from stamen.errors import RunError
from stamen.server.strategy.aggregate import WeightedSum


def test_one_model_comes_back_exactly() -> None:
    """The mean of one model, whatever its weight, is that model to the bit."""
    rng = np.random.default_rng(0)
    model = [rng.standard_normal((300, 7)).astype(np.float32), np.arange(5, dtype=np.int64)]
    acc = WeightedSum(compact=True)
    acc.add(model, 37)
    for got, want in zip(acc.mean(consume=True), model, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_running_mean_matches_the_float64_sum() -> None:
    """Many float32 models: the compact mean is within a few ulps of the float64 one, and
    float64 layers stay exact sums."""
    rng = np.random.default_rng(1)
    models = [
        [rng.standard_normal(50_000).astype(np.float32), rng.standard_normal(9)] for _ in range(12)
    ]
    weights = rng.integers(1, 500, size=12)
    compact, exact = WeightedSum(compact=True), WeightedSum()
    for model, weight in zip(models, weights, strict=True):
        compact.add(model, int(weight))
        exact.add(model, int(weight))
    got, want = compact.mean(), exact.mean()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[1], want[1])
    total = float(weights.sum())  # the sum is the mean times the total weight
    np.testing.assert_allclose(compact.sum()[0], exact.sum()[0], rtol=1e-6, atol=total * 1e-6)


def test_compact_layers_take_the_models_dtype() -> None:
    """The running state of a float32 layer is float32: one model's worth of memory."""
    acc = WeightedSum(compact=True)
    acc.add([np.ones(1000, dtype=np.float32)], 2)
    assert acc._acc is not None and acc._acc[0].dtype == np.float32
    assert WeightedSum()._acc is None


def test_consumed_sum_cannot_be_read_again() -> None:
    """mean(consume=True) hands the state out: a second read is an error, not stale data."""
    acc = WeightedSum(compact=True)
    acc.add([np.ones(4, dtype=np.float32)], 1)
    acc.mean(consume=True)
    with pytest.raises(RunError, match="at least one result"):
        acc.mean()
