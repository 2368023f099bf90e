"""The blocked FedAvg kernel gives the bits of the plain expressions; views copy nothing.

The references are the expressions the kernel replaces. For float32 layers, Flower 1.12's:
``reduce(np.add, [w_k * n_k ...]) / sum n_k`` in float32 (one model being its own mean).
For the others: ``acc = zeros(float64)``, then ``acc += np.multiply(w_k, n_k,
dtype=float64)`` per model, then ``acc / sum n_k`` cast back to the layer's dtype (rounded
for integer and boolean layers); a :class:`WeightedSum` that is not compact computes this
for float32 layers too.
"""

from __future__ import annotations

import importlib
import tracemalloc
from functools import reduce
from typing import Any

import numpy as np
import pytest

from stamen.errors import DecodeError, RunError
from stamen.messages import Parameters
from stamen.ndarrays import (
    bytes_to_ndarray_view,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    parameters_to_views,
)
from stamen.server.strategy import FedAvg
from stamen.server.strategy.aggregate import WeightedSum, aggregate
from stamen.typing import NDArray, NDArrays

# The module (the package exports its function ``aggregate`` under the same name).
aggregate_module = importlib.import_module("stamen.server.strategy.aggregate")

DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.complex64,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (41,)]


def reference_mean(results: list[tuple[NDArrays, float]]) -> NDArrays:
    """The plain expression, with full-size temporaries."""
    first = results[0][0]
    sums = [np.zeros(a.shape, dtype=np.result_type(a.dtype, np.float64)) for a in first]
    total: float = 0
    for arrays, weight in results:
        for acc, array in zip(sums, arrays, strict=True):
            acc += np.multiply(array, weight, dtype=acc.dtype)
        total += weight
    out = []
    for acc, array in zip(sums, first, strict=True):
        mean = np.asarray(acc / total)
        if np.issubdtype(array.dtype, np.inexact):
            out.append(mean.astype(array.dtype))
        else:
            out.append(np.rint(mean).astype(array.dtype))
    return out


def flower_mean(results: list[tuple[NDArrays, float]]) -> NDArrays:
    """Flower's expression for float32 layers: float32 products, summed in order."""
    if len(results) == 1:
        return [a.copy() for a in results[0][0]]
    total = np.float32(sum(w for _, w in results))
    weighted = [[a * np.float32(w) for a in arrays] for arrays, w in results]
    return [reduce(np.add, layers) / total for layers in zip(*weighted, strict=True)]


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> NDArray:
    values = rng.normal(size=shape) * 50
    if np.issubdtype(dtype, np.complexfloating):
        values = values + 1j * rng.normal(size=shape)
    if np.issubdtype(dtype, np.unsignedinteger) or dtype is np.bool_:
        values = np.abs(values)
    array = np.asarray(values).astype(dtype)
    if array.ndim >= 2 and rng.random() < 0.4:
        array = np.asfortranarray(array)  # also mixed with C-ordered models
    if array.size and np.issubdtype(dtype, np.floating):
        array[(0,) * array.ndim] = -0.0  # 0 + (-0.0) is +0.0: the sign must match
    return array


def assert_same_bits(got: NDArrays, expected: NDArrays) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert isinstance(a, np.ndarray)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("block", "threads"), [(1, 1), (4, 3), (7, 2), (1 << 17, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_gives_the_bits_of_the_plain_expression(
    monkeypatch: Any, block: int, threads: int, dtype: Any
) -> None:
    """aggregate of a list, of a generator, and WeightedSum (compact or not): the same bits
    as the plain expressions, whatever the block size (so across block boundaries), the
    split of layers over threads, the memory order of each model, the number of models
    and the weights. (A compact sum keeps float16 layers as a running mean: see
    test_compact_sum.)"""
    monkeypatch.setattr(aggregate_module, "BLOCK", block)
    monkeypatch.setattr(aggregate_module, "THREADS", threads)
    monkeypatch.setattr(aggregate_module, "MIN_PART_BLOCKS", 1)
    rng = np.random.default_rng(block)
    for count in (1, 2, 5):
        for weights_kind in ("int", "float", "ones"):
            models = [[random_array(rng, shape, dtype) for shape in SHAPES] for _ in range(count)]
            weights: list[float] = [int(w) for w in rng.integers(1, 500, size=count)]
            if weights_kind == "float":
                weights = [w + 0.25 for w in weights]
            elif weights_kind == "ones":  # the kernel skips multiplying by 1 (real layers)
                weights = [1] * count
            results = list(zip(models, weights, strict=True))
            float64_sum = reference_mean(results)
            expected = flower_mean(results) if dtype is np.float32 else float64_sum
            assert_same_bits(aggregate(results), expected)
            running, compact = WeightedSum(), WeightedSum(compact=True)
            for arrays, weight in results:
                running.add(arrays, weight)
                compact.add(arrays, weight)
            assert_same_bits(running.mean(), float64_sum)
            assert running.count == compact.count == count
            if dtype is not np.float16:
                assert_same_bits(aggregate(iter(results)), expected)
                assert_same_bits(compact.mean(), expected)


def test_layers_are_shared_among_threads_and_errors_reach_the_caller(monkeypatch: Any) -> None:
    """Every part of a large layer is worked on once; an error of any part is raised."""
    monkeypatch.setattr(aggregate_module, "BLOCK", 2)
    monkeypatch.setattr(aggregate_module, "THREADS", 3)
    monkeypatch.setattr(aggregate_module, "MIN_PART_BLOCKS", 2)
    seen: list[tuple[int, int]] = []
    aggregate_module._in_parts(19, lambda start, stop: seen.append((start, stop)))
    assert sorted(seen) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 19)]

    def fail_after_the_first(start: int, stop: int) -> None:
        if start > 0:
            raise ValueError(f"part {start}-{stop}")

    with pytest.raises(ValueError, match="part"):
        aggregate_module._in_parts(19, fail_after_the_first)


def test_kernel_keeps_nan_and_inf() -> None:
    """NaN and Inf propagate as in the plain expression (aggregate itself does not check)."""
    models = [[np.array([np.nan, 1.0, np.inf], np.float32)], [np.ones(3, np.float32)]]
    result = aggregate([(models[0], 1), (models[1], 3)])[0]
    assert np.isnan(result[0]) and result[1] == 1.0 and result[2] == np.inf


def test_kernel_errors_name_expected_and_received() -> None:
    with pytest.raises(RunError, match="expected at least one result, received none"):
        aggregate([])
    with pytest.raises(RunError, match=r"result 1 has layers \[\(3,\)\], expected \[\(2,\)\]"):
        aggregate([([np.zeros(2)], 1), ([np.zeros(3)], 1)])
    with pytest.raises(RunError, match="0 examples in total"):
        aggregate([([np.zeros(2)], 0)])
    running = WeightedSum()
    running.add([np.zeros(2)], 1)
    with pytest.raises(RunError, match=r"result 1 has layers \[\(3,\)\], expected \[\(2,\)\]"):
        running.add([np.zeros(3)], 1)


def test_kernel_reads_read_only_views_and_leaves_inputs_alone() -> None:
    """Inputs may be read-only views (as decoded by parameters_to_views); none is modified."""
    arrays = [np.arange(10, dtype=np.float32), np.ones((3, 3), np.float32)]
    parameters = ndarrays_to_parameters(arrays)
    views = parameters_to_views(parameters)
    snapshot = list(parameters.tensors)
    assert_same_bits(aggregate([(views, 2), (views, 1)]), reference_mean([(arrays, 2)]))
    assert parameters.tensors == snapshot


def test_aggregate_allocates_only_the_result() -> None:
    """10 models of 4 MB: aggregate of the list allocates the result and two cached blocks,
    no float64 sum of the model's size (which alone is twice the model)."""
    layer = np.ones(1 << 20, np.float32)
    results = [([layer + k], 1) for k in range(10)]
    tracemalloc.start()
    try:
        aggregate(results)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * layer.nbytes


def test_fedavg_aggregate_fit_copies_no_result(kit: Any) -> None:
    """aggregate_fit reads the results in place: its peak memory is about the new model and
    its encoding, whatever the number of results."""
    layer = np.zeros(1 << 20, np.float32)
    results = kit.results([([np.full_like(layer, k)], 1) for k in range(10)])
    strategy = FedAvg()
    strategy.configure_fit(1, kit.params([layer]), kit.manager(2))
    tracemalloc.start()
    try:
        parameters, _ = strategy.aggregate_fit(1, results, [])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * layer.nbytes
    np.testing.assert_array_equal(kit.arrays(parameters)[0], np.full_like(layer, 4.5))


# --- views over .npy bytes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.array(3.5, dtype=np.float16),
        np.zeros((0, 3), np.int8),
        np.array([1 + 2j], np.complex64),
        np.arange(6, dtype=">i4").reshape(2, 3),
    ],
)
def test_views_equal_the_copies_and_copy_nothing(array: NDArray) -> None:
    """parameters_to_views gives what parameters_to_ndarrays gives, as read-only views over
    the tensor bytes; parameters_to_ndarrays still gives writable copies."""
    parameters = ndarrays_to_parameters([array])
    (view,) = parameters_to_views(parameters)
    (copy,) = parameters_to_ndarrays(parameters)
    for decoded in (view, copy):
        assert (decoded.dtype, decoded.shape) == (array.dtype, array.shape)
        np.testing.assert_array_equal(decoded, array)
    assert not view.flags.writeable
    assert copy.flags.writeable and copy.flags.owndata
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    assert base is parameters.tensors[0]  # the view's memory is the tensor's
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert view.flags.f_contiguous


@pytest.mark.parametrize("kind", ["bytes", "memoryview"])
def test_views_allocate_nothing_of_the_model_size(kind: str) -> None:
    """Over bytes or over a memoryview into a received message, only the header is read."""
    blob = ndarray_to_bytes(np.ones(1 << 20, np.float32))
    tensor = blob if kind == "bytes" else memoryview(blob)
    tracemalloc.start()
    try:
        (view,) = parameters_to_views(Parameters([tensor], "numpy.ndarray"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert view.sum() == 1 << 20
    assert not view.flags.writeable


def test_views_over_a_writable_buffer_are_read_only() -> None:
    tensor = ndarray_to_bytes(np.ones(4, np.float32))
    view = bytes_to_ndarray_view(bytearray(tensor))  # type: ignore[arg-type]
    assert not view.flags.writeable


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (b"not npy", "not a valid .npy array"),
        (ndarray_to_bytes(np.ones(4, np.float32))[:-1], "the data has 15 bytes"),
        (ndarray_to_bytes(np.ones(4, np.float32)) + b"x", "the data has 17 bytes"),
        (
            ndarray_to_bytes(np.ones(4, np.float32)).replace(b"(4,)", b"(9,)"),
            r"header says \(9,\) of float32 \(36 bytes\), the data has 16 bytes",
        ),
        (
            ndarray_to_bytes(np.ones(4, np.float32)).replace(b"'<f4'", b"'|O' "),
            "Python objects",
        ),
    ],
)
def test_views_make_the_checks_of_the_copies(tensor: bytes, message: str) -> None:
    """Bad bytes are refused the same way by both decoders, with what was expected."""
    for decode in (parameters_to_views, parameters_to_ndarrays):
        with pytest.raises(DecodeError, match=message):
            decode(Parameters([tensor], "numpy.ndarray"))
    with pytest.raises(DecodeError, match=r"expected 'numpy\.ndarray', received 'torch'"):
        parameters_to_views(Parameters([], "torch"))
