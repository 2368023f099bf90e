"""WeightedSum(compact=True): float32 layers summed in float32 (Flower's arithmetic),
float16 layers as a running mean, both in their own dtype."""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest

from stamen.errors import RunError
from stamen.messages import Code, FitRes, Status
from stamen.ndarrays import (
    Lease,
    ReceivedBuffer,
    ndarrays_to_parameters,
    parameters_to_views,
    received_buffer_of,
)
from stamen.server.strategy.aggregate import WeightedSum
from stamen.wire import decode_reply, encode_reply


def test_one_model_comes_back_exactly() -> None:
    """The mean of one model, whatever its weight, is that model to the bit."""
    rng = np.random.default_rng(0)
    model = [rng.standard_normal((300, 7)).astype(np.float32), np.arange(5, dtype=np.int64)]
    acc = WeightedSum(compact=True)
    acc.add(model, 37)
    for got, want in zip(acc.mean(consume=True), model, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_float32_layers_are_summed_as_flower_sums_them() -> None:
    """Flower 1.12's ``aggregate``, written as it is: ``layer * num_examples`` for each
    result (a float32 product), ``reduce(np.add, ...)`` in arrival order, ``/ total``. The
    compact sum computes the same bits, weights of 1 and integer weights alike."""
    rng = np.random.default_rng(7)
    for weights in ([1, 1, 1, 1, 1], [3, 1, 70, 2, 1_000]):
        models = [[rng.standard_normal(40_000).astype(np.float32)] for _ in weights]
        acc = WeightedSum(compact=True)
        for model, weight in zip(models, weights, strict=True):
            acc.add(model, weight)
        total = sum(weights)
        pairs = zip(models, weights, strict=True)
        weighted = [[layer * n for layer in model] for model, n in pairs]
        flower = [reduce(np.add, layers) / total for layers in zip(*weighted, strict=True)]
        [got] = acc.mean(consume=True)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, flower[0])
        assert got.tobytes() == flower[0].tobytes()


def test_one_model_comes_back_exactly_after_its_sum_was_read() -> None:
    """The first model's weight is applied to the float32 sum only when it is needed: a
    second model or :meth:`sum`, which then reports ``n * w``."""
    model = [np.float32([0.1, 1 / 3, 7e-8, -2.5])]
    acc = WeightedSum(compact=True)
    acc.add(model, 3)
    np.testing.assert_array_equal(acc.mean()[0], model[0])
    np.testing.assert_array_equal(acc.sum()[0], model[0] * np.float32(3))
    acc.add([np.float32([1, 1, 1, 1])], 1)
    np.testing.assert_array_equal(acc.sum()[0], model[0] * np.float32(3) + np.float32(1))


def test_float16_layers_keep_a_running_mean() -> None:
    """float16 sums overflow at 65,504; its running mean does not."""
    acc = WeightedSum(compact=True)
    for _ in range(3):
        acc.add([np.full(4, 60_000, dtype=np.float16)], 1_000)
    [mean] = acc.mean(consume=True)
    assert mean.dtype == np.float16
    np.testing.assert_array_equal(mean, np.full(4, 60_000, dtype=np.float16))


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
    """The state of a float32 layer is float32: one model's worth of memory."""
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


def _received_views(arrays: list[np.ndarray]) -> tuple[ReceivedBuffer, list[np.ndarray]]:
    """Read-only views of ``arrays`` decoded from a message in a ReceivedBuffer."""
    message = encode_reply(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {}))
    buffer = ReceivedBuffer.allocate(len(message))
    buffer[:] = np.frombuffer(message, dtype=np.uint8)
    reply = decode_reply(buffer.data.toreadonly())
    assert isinstance(reply, FitRes)
    return buffer, parameters_to_views(reply.parameters)


def test_a_leased_first_result_becomes_the_running_mean_where_it_lies() -> None:
    """Under the caller's lease: the first model's float32 layers are kept in its received
    buffer (no copy; its release callbacks run at once), other layers are summed apart,
    and the mean is bit for bit the one computed from copies."""
    rng = np.random.default_rng(3)
    models = [
        [rng.standard_normal(10_000).astype(np.float32), rng.standard_normal(4)] for _ in range(4)
    ]
    weights = [3, 1, 7, 2]
    reference = WeightedSum(compact=True)
    for model, weight in zip(models, weights, strict=True):
        reference.add(model, weight)
    released: list[int] = []
    buffer, first = _received_views(models[0])
    buffer.when_released(lambda: released.append(1))
    acc = WeightedSum(compact=True)
    acc.add(first, weights[0], lease=Lease([buffer]))
    assert released == [1]  # kept: its receive slot is given back now
    for model, weight in zip(models[1:], weights[1:], strict=True):
        acc.add(model, weight, lease=Lease())
    mean = acc.mean(consume=True)
    assert received_buffer_of(mean[0]) is buffer
    assert received_buffer_of(mean[1]) is None  # float64: a float64 sum, then divided
    for got, want in zip(mean, reference.mean(consume=True), strict=True):
        np.testing.assert_array_equal(got, want)


def test_results_without_a_lease_are_left_untouched() -> None:
    model = [np.arange(8, dtype=np.float32)]
    _, first = _received_views(model)
    acc = WeightedSum(compact=True)
    acc.add(first, 1)
    acc.add([np.full(8, 100, dtype=np.float32)], 1)
    [mean] = acc.mean(consume=True)
    assert received_buffer_of(mean) is None
    np.testing.assert_array_equal(first[0], model[0])
    np.testing.assert_array_equal(mean, (model[0] + 100) / 2)


def test_a_lease_on_other_memory_lets_nothing_be_kept() -> None:
    """Only the buffers a lease names may become the running mean."""
    model = [np.arange(8, dtype=np.float32)]
    _, first = _received_views(model)
    other, _ = _received_views(model)
    acc = WeightedSum(compact=True)
    acc.add(first, 1, lease=Lease([other]))
    [mean] = acc.mean(consume=True)
    assert received_buffer_of(mean) is None
    np.testing.assert_array_equal(first[0], model[0])
