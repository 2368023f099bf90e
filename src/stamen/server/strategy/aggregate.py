"""Pure NumPy aggregation functions shared by the strategies.

Every function takes decoded models (lists of arrays) and returns a model whose layers
have the dtypes of the input layers (:func:`mean_dtype`): the arithmetic runs in float64
(complex128 for complex layers) and the result is cast once, integer and boolean layers
after rounding to the nearest value. When the inputs of a layer differ in dtype (float32
results of a float64 model, float64 results of an int64 one), the result takes NumPy's
promotion of their dtypes, as Flower's ``aggregate`` does (integers: float64, the dtype of
a true division).

Memory and speed: :func:`aggregate` and :class:`WeightedSum` run in blocks that stay in the
CPU cache (see :data:`BLOCK`), with no temporary of a model's size (large layers optionally
on several threads, :data:`THREADS`). :func:`aggregate` of a list reads each input once
and allocates only the result; :class:`WeightedSum` consumes its models one at a time into
one float64 accumulator, so it holds one model however many results there are. The robust
rules (:func:`aggregate_median`, :func:`aggregate_trimmed_avg`, :func:`aggregate_krum`,
:func:`aggregate_bulyan`) need all the models at once; they read them a part of every
model at a time (:data:`PART_VALUES`). Every kernel lets the pages of a spilled result go
once it has read them (:func:`~stamen.server.spill.release`), so models that wait on disk
are never all in memory.

The names and arguments are Flower 1.12's (``flwr.server.strategy.aggregate``).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from ..._dtypes import cast_like
from ...errors import ConfigError, RunError
from ...ndarrays import Lease, npy_placed
from ...typing import NDArray, NDArrays
from ..spill import release

__all__ = [
    "BLOCK",
    "MIN_PART_BLOCKS",
    "PART_VALUES",
    "THREADS",
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
    "mean_dtype",
    "pairwise_squared_distances",
    "weighted_loss_avg",
]


def _work_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype arithmetic on a layer of ``dtype`` runs in: float64 or wider."""
    return np.result_type(dtype, np.float64)


def mean_dtype(dtypes: Iterable[np.dtype[Any]]) -> np.dtype[Any]:
    """The dtype of a mean of layers of ``dtypes``.

    Layers of one dtype keep it (integer and boolean means are rounded), so a model's
    layout never drifts. Layers of several dtypes give NumPy's promotion of them, and
    float64 when that is an integer or boolean dtype (a true division): what Flower 1.12's
    ``aggregate`` gives (``reduce(np.add, [layer * n_k]) / total``).
    """
    unique: list[np.dtype[Any]] = []
    for dtype in dtypes:
        if dtype not in unique:
            unique.append(np.dtype(dtype))
    if not unique:
        raise RunError("aggregate: expected at least one layer, received none")
    if len(unique) == 1:
        return unique[0]
    promoted: np.dtype[Any] = np.result_type(*unique)
    return promoted if promoted.kind in "fc" else np.dtype(np.float64)


# --- the weighted-sum kernel -------------------------------------------------------------
#
# A weighted mean reads every input value once; done layer-wide with NumPy expressions it
# also writes and re-reads a float64 temporary of the layer's size per term, which makes it
# several times slower than the memory allows. These kernels instead walk each layer in
# blocks of BLOCK elements with preallocated scratch blocks that stay in the CPU cache: per
# block, each term is cast to float64 (exact), multiplied by its weight and added. Every
# value goes through exactly the operations, in the same order, as
# ``acc = 0; acc += np.multiply(w_k, n_k, dtype=float64) ...; cast(acc / sum n_k)``, so the
# results are bit-identical to that expression (multiplying a real value by a weight of 1
# is skipped: it gives the value itself). With THREADS > 1, a large layer is cut into parts
# of whole blocks that the threads take in turn (NumPy releases the GIL in its loops); a
# value goes through the same operations whichever thread takes its part.

BLOCK = 1 << 17
"""Elements per block of the aggregation kernels: small enough to stay in a core's
cache, large enough to amortise NumPy's per-call cost (measured: ``bench/HISTORY.md``)."""


THREADS = min(2, os.cpu_count() or 1)
"""Threads that share the blocks of a large layer (the caller one of them): 2, or 1 on a
one-core machine.

The values and their operations are the same whatever the number, so are the results.
Beyond about 4 threads the memory bus is the limit (measurements: ``bench/HISTORY.md``).
"""

MIN_PART_BLOCKS = 8
"""Blocks a thread takes at a time: a layer of fewer stays in the calling thread."""


def _in_parts(size: int, work: Callable[[int, int], None]) -> None:
    """``work(start, stop)`` over ``[0, size)``, in parts of ``MIN_PART_BLOCKS`` blocks.

    Up to :data:`THREADS` threads (the caller one of them) take the parts in turn, so a
    thread slowed down by another process does less of the work instead of holding up the
    rest. The first exception of any part stops the handing out of parts and is raised
    here once the threads are done.
    """
    part = MIN_PART_BLOCKS * BLOCK
    parts = -(-size // part)
    threads = min(THREADS, parts)
    if threads <= 1:
        work(0, size)
        return
    next_part = itertools.count()  # next() on it is atomic under the GIL
    errors: list[BaseException] = []

    def run() -> None:
        while not errors:
            start = next(next_part) * part
            if start >= size:
                return
            try:
                work(start, min(start + part, size))
            except BaseException as exc:  # raised in the calling thread
                errors.append(exc)

    helpers = [
        threading.Thread(target=run, name="stamen-aggregate", daemon=True)
        for _ in range(threads - 1)
    ]
    for helper in helpers:
        helper.start()
    try:
        run()
    finally:
        for helper in helpers:
            helper.join()
    if errors:
        raise errors[0]


def _order(array: NDArray) -> Literal["C", "F"]:
    """The memory order a result of ``array``'s layout is allocated in: "F" or "C"."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def _flat(array: NDArray, order: Literal["C", "F"]) -> NDArray:
    """A 1-D view of ``array``'s values in ``order`` ("C" or "F"): a copy if not so laid out.

    Arrays of one shape flattened in one order pair their values index by index.
    """
    if order == "F":
        return np.asfortranarray(array).T.reshape(-1)
    return np.ascontiguousarray(array).reshape(-1)


def _scaled_into(out: NDArray, block: NDArray, weight: np.generic) -> None:
    """``out = weight * block`` in ``out``'s dtype (the cast of ``block`` is exact)."""
    if weight == 1 and out.dtype.kind == "f":
        np.copyto(out, block)  # a real x * 1.0 is x, to the bit (not so for complex x)
    elif block.dtype == out.dtype:
        np.multiply(block, weight, out=out)
    else:
        np.copyto(out, block)  # faster than a mixed-dtype multiply: NumPy buffers those
        np.multiply(out, weight, out=out)


def _fold_into(acc: NDArray, block: NDArray, weight: np.generic, scratch: NDArray | None) -> None:
    """``acc += weight * block``, with ``scratch`` (of ``acc``'s size; None: made here if
    needed) for the product."""
    if weight == 1 and acc.dtype.kind == "f" and block.dtype == acc.dtype:
        np.add(acc, block, out=acc)  # x * 1.0 is x: no product to hold
        return
    if scratch is None:
        scratch = np.empty(acc.size, dtype=acc.dtype)
    _scaled_into(scratch, block, weight)
    np.add(acc, scratch, out=acc)


def _start_into(acc: NDArray, block: NDArray, weight: np.generic) -> None:
    """``acc = 0 + weight * block``: the first term (``+ 0`` makes ``-0.0`` into ``0.0``)."""
    _scaled_into(acc, block, weight)
    np.add(acc, acc.dtype.type(0), out=acc)


def _mean_into(out: NDArray, acc: NDArray, divisor: np.generic, scratch: NDArray) -> None:
    """``out = cast_like(acc / divisor, out.dtype)``; ``scratch`` (may be ``acc``) is clobbered."""
    if out.dtype == acc.dtype:
        np.divide(acc, divisor, out=out)
        return
    np.divide(acc, divisor, out=scratch)
    if not np.issubdtype(out.dtype, np.inexact):
        np.rint(scratch, out=scratch)
    np.copyto(out, scratch, casting="unsafe")  # what astype does


def _fold_layer(acc: NDArray, values: NDArray, weight: np.generic, first: bool) -> None:
    """``acc += weight * values`` (``acc = 0 + weight * values`` if ``first``); 1-D arrays."""
    if acc.size <= BLOCK:  # one block (many small results): no parts, no scratch to share
        if first:
            _start_into(acc, values, weight)
        else:
            _fold_into(acc, values, weight, None)
        release(values)
        return

    def work(start: int, stop: int) -> None:
        if first:
            for lo in range(start, stop, BLOCK):
                hi = min(lo + BLOCK, stop)
                _start_into(acc[lo:hi], values[lo:hi], weight)
        else:
            scratch = np.empty(min(BLOCK, stop - start), dtype=acc.dtype)
            for lo in range(start, stop, BLOCK):
                block = acc[lo : min(lo + BLOCK, stop)]
                _fold_into(block, values[lo : lo + block.size], weight, scratch[: block.size])
        release(values[start:stop])  # a spilled result's pages go once read

    _in_parts(acc.size, work)


def _copy_layer(out: NDArray, values: NDArray) -> None:
    """``out[:] = values``; 1-D arrays."""

    def work(start: int, stop: int) -> None:
        np.copyto(out[start:stop], values[start:stop])
        release(values[start:stop])

    _in_parts(out.size, work)


def _mean_layer(out: NDArray, acc: NDArray, divisor: np.generic) -> None:
    """``out = cast_like(acc / divisor, out.dtype)``; 1-D arrays, ``acc`` left as it is."""

    def work(start: int, stop: int) -> None:
        scratch = np.empty(min(BLOCK, stop - start), dtype=acc.dtype)
        for lo in range(start, stop, BLOCK):
            block = acc[lo : min(lo + BLOCK, stop)]
            _mean_into(out[lo : lo + block.size], block, divisor, scratch[: block.size])

    _in_parts(acc.size, work)


def _scale_layer(layer: NDArray, scale: np.generic) -> None:
    """``layer *= scale`` in place; a 1-D array."""

    def work(start: int, stop: int) -> None:
        np.multiply(layer[start:stop], scale, out=layer[start:stop])

    _in_parts(layer.size, work)


def _result_layer(
    shape: tuple[int, ...], dtype: np.dtype[Any], order: Literal["C", "F"]
) -> NDArray:
    """An uninitialized layer of a new model: C-order ones in their ``.npy`` blob
    (:func:`~stamen.ndarrays.npy_placed`), so the model becomes Parameters without a copy."""
    if order == "C":
        return npy_placed(shape, dtype)
    return np.empty(shape, dtype=dtype, order=order)


def _compact(dtype: np.dtype[Any]) -> bool:
    """Layers a compact :class:`WeightedSum` keeps in their own dtype: float32 as a sum
    (Flower's arithmetic), float16 (whose sums overflow at 65,504) as a running mean."""
    return dtype.kind == "f" and dtype.itemsize <= 4


def _sum_dtype(dtype: np.dtype[Any], compact: bool) -> np.dtype[Any]:
    """The dtype a sum of layers whose mean is of ``dtype`` is kept in: float32 for a
    float32 layer of a compact sum, else float64 or wider (:func:`_work_dtype`)."""
    if compact and dtype == np.float32:
        return dtype
    return _work_dtype(dtype)


def _float32_sum(layer: NDArray, running: bool) -> bool:
    """Whether a :class:`WeightedSum` layer is a compact sum's float32 sum (a sum that is
    not compact is float64 or wider)."""
    return not running and layer.dtype == np.float32


def _fold_mean_layer(acc: NDArray, values: NDArray, ratio: float, first: bool) -> None:
    """``acc += ratio * (values - acc)``, computed in float64 block by block; 1-D arrays."""

    def work(start: int, stop: int) -> None:
        if first:
            np.copyto(acc[start:stop], values[start:stop])
            release(values[start:stop])
            return
        mean = np.empty(min(BLOCK, stop - start), dtype=np.float64)
        step = np.empty_like(mean)
        for lo in range(start, stop, BLOCK):
            hi = min(lo + BLOCK, stop)
            m, d = mean[: hi - lo], step[: hi - lo]
            np.copyto(m, acc[lo:hi])
            np.copyto(d, values[lo:hi])
            np.subtract(d, m, out=d)
            np.multiply(d, ratio, out=d)
            np.add(m, d, out=m)
            np.copyto(acc[lo:hi], m, casting="unsafe")
        release(values[start:stop])

    _in_parts(acc.size, work)


class WeightedSum:
    """A running weighted sum of models: one accumulator, whatever the number of models.

    ``add(w_k, n_k)`` for each model, then :meth:`mean` returns ``sum_k n_k w_k / sum_k n_k``
    (:meth:`sum` the raw ``sum_k n_k w_k``), each layer in the :func:`mean_dtype` of the
    layers added. The sum is kept in float64 (complex128 for complex layers); each
    :meth:`add` folds its model in block by block, so it allocates nothing of the model's
    size and keeps no reference to ``arrays`` (read-only views, e.g.
    :func:`~stamen.ndarrays.parameters_to_views`, are fine).

    ``compact=True`` (the server's streaming aggregation) halves the memory of float32 and
    float16 layers by keeping them in their own dtype. A float32 layer is summed in
    float32, ``acc += n_k * w_k`` and ``acc / N`` at the end: Flower 1.12's arithmetic
    (``reduce(np.add, [w * n ...]) / N``), bit for bit when the results come in the same
    order, and about twice as fast as casting every value to float64 and back. A float16
    layer, whose sums would overflow at 65,504, is kept as a running weighted *mean*, each
    update ``m += (n_k / N_k) (w_k - m)`` computed in float64 and rounded once. Either way
    the mean of one model is that model exactly; with several, results may differ from
    the float64 sum in the last bits. A layer that receives a wider dtype (a float64
    result after float32 ones) becomes a float64 sum from there on, so the mean is
    computed in the promoted dtype.
    """

    def __init__(self, *, compact: bool = False) -> None:
        self._acc: list[NDArray] | None = None
        self._seen: list[list[np.dtype[Any]]] = []
        self._running: list[bool] = []
        self._pending: float | None = None  # the first model's weight, until _settle
        self._compact = compact
        self.total_weight: float = 0
        self.count = 0

    def _widen(self, arrays: NDArrays) -> None:
        """Make each accumulator able to take its layer of ``arrays`` (a dtype change)."""
        assert self._acc is not None
        for index, array in enumerate(arrays):
            seen = self._seen[index]
            if array.dtype in seen:
                continue
            seen.append(array.dtype)
            layer = self._acc[index]
            target = mean_dtype(seen)
            if self._running[index]:
                if target == layer.dtype:
                    continue  # a narrower float (float16 into a float32 mean) folds in
                work = _work_dtype(target)
                widened = np.empty(layer.shape, dtype=work, order=_order(layer))
                np.multiply(layer, work.type(self.total_weight), out=widened)
                self._acc[index] = widened
                self._running[index] = False
            elif _sum_dtype(target, self._compact) != layer.dtype:
                self._acc[index] = layer.astype(_sum_dtype(target, self._compact), order="K")

    def add(self, arrays: NDArrays, weight: float = 1, *, lease: Lease | None = None) -> None:
        """Add ``weight * arrays``.

        Args:
            arrays: The model's layers (read-only views are fine).
            weight: Its weight.
            lease: The caller's lease on the received memory ``arrays`` lie in (a result
                that nobody reads afterwards). A compact sum then keeps the first model's
                float32/float16 layers that lie in a buffer the lease names as its
                running mean where they are, instead of copying them, and keeps that
                memory (:meth:`~stamen.ndarrays.Lease.keep`: its release callbacks run).

        Raises:
            RunError: ``arrays`` does not have the layers of the first model added.
        """
        first = self._acc is None
        adopted: list[bool] = [False] * len(arrays)
        if self._acc is None:
            self._acc = []
            self._running = []
            self._pending = weight
            for index, a in enumerate(arrays):
                compact = self._compact and _compact(a.dtype)
                self._running.append(compact and a.dtype != np.float32)
                alias = lease.alias(a) if compact and lease is not None else None
                if alias is not None:
                    self._acc.append(alias)
                    adopted[index] = True
                    continue
                if compact:
                    self._acc.append(_result_layer(a.shape, a.dtype, _order(a)))
                else:
                    self._acc.append(np.empty(a.shape, dtype=_work_dtype(a.dtype), order=_order(a)))
            self._seen = [[a.dtype] for a in arrays]
            if lease is not None and any(adopted):  # slots are not held until round end
                lease.keep()
        elif len(arrays) != len(self._acc) or any(
            a.shape != s.shape for a, s in zip(arrays, self._acc, strict=True)
        ):
            raise RunError(
                f"aggregate: result {self.count} has layers {[a.shape for a in arrays]}, "
                f"expected {[s.shape for s in self._acc]}"
            )
        else:
            self._settle()
            self._widen(arrays)
        total = self.total_weight + weight
        for index, (array, in_place) in enumerate(zip(arrays, adopted, strict=True)):
            if in_place:
                continue  # the model's own memory: its mean (a float32 sum's first term)
            layer = self._acc[index]
            order = _order(layer)
            if self._running[index]:
                if total <= 0:
                    raise RunError(f"aggregate: weights add up to {total}; cannot weight by it")
                _fold_mean_layer(_flat(layer, order), _flat(array, order), weight / total, first)
            elif first and _float32_sum(layer, running=False):
                _copy_layer(_flat(layer, order), _flat(array, order))  # as it is: see _settle
            else:
                scale = layer.dtype.type(weight)
                _fold_layer(_flat(layer, order), _flat(array, order), scale, first)
            release(array)
        self.total_weight = total
        self.count += 1

    def _settle(self) -> None:
        """Apply the first model's weight to the float32 sums.

        They hold that model as it came until a second one is added, so the mean of one
        model is that model to the bit (``n * w / n`` in float32 may not be ``w``).
        """
        if self._pending is None or self._acc is None:
            return
        if self._pending != 1:
            for layer, running in zip(self._acc, self._running, strict=True):
                if _float32_sum(layer, running):
                    _scale_layer(_flat(layer, _order(layer)), np.float32(self._pending))
        self._pending = None

    def sum(self) -> NDArrays:
        """``sum_k n_k w_k`` in float64 (complex128 for complex layers; float32 for the
        float32 layers of a compact sum).

        Raises:
            RunError: nothing was added.
        """
        if self._acc is None:
            raise RunError("aggregate: expected at least one result, received none")
        self._settle()
        return [
            layer * np.float64(self.total_weight) if running else layer.copy()
            for layer, running in zip(self._acc, self._running, strict=True)
        ]

    def mean(self, *, consume: bool = False) -> NDArrays:
        """``sum_k n_k w_k / sum_k n_k``, each layer in the :func:`mean_dtype` of its inputs.

        ``consume=True``: the sum is not needed afterwards, so running means are handed
        out as they are, a sum kept in the result's dtype (a compact float32 sum) is
        divided where it lies, and each float64 sum is freed once its layer is done (the
        peak stays near one model's sums instead of sums plus result).

        Raises:
            RunError: nothing was added, or the weights add up to 0 or less.
        """
        if self._acc is None:
            raise RunError("aggregate: expected at least one result, received none")
        _check_total(self.total_weight)
        out: NDArrays = []
        layers = self._acc
        if consume:
            self._acc = None
        for index, seen in enumerate(self._seen):
            dtype = mean_dtype(seen)
            layer = layers[index]
            if consume:
                layers[index] = np.empty(0)  # drop our reference as we go
            running = self._running[index]
            float32_sum = _float32_sum(layer, running)
            one_model = float32_sum and self._pending is not None
            if (running or one_model) and layer.dtype == dtype:
                out.append(layer if consume else layer.copy())  # a mean already
                continue
            order = _order(layer)
            # a consumed float32 sum is divided where it lies: it is the result
            in_place = consume and float32_sum and dtype == np.float32
            result = layer if in_place else _result_layer(layer.shape, dtype, order)
            divisor = layer.dtype.type(self.total_weight)
            _mean_layer(_flat(result, order), _flat(layer, order), divisor)
            out.append(result)
        return out


def _check_total(total: float) -> None:
    if total <= 0:
        raise RunError(
            f"aggregate: the results hold {total} examples in total; cannot weight by it"
        )


def _mean_of_layer(arrays: Sequence[NDArray], weights: Sequence[float], total: float) -> NDArray:
    """``sum_k weights[k] * arrays[k] / total`` in :func:`mean_dtype`, block by block.

    For each block of the result, every term is folded into one cached block, so each
    input value is read once and each result value written once. float32 layers are
    summed in float32, others in float64 or wider: the arithmetic of a compact
    :class:`WeightedSum` fed the same models in the same order, to the bit (the first
    model's weight is applied when a second comes, so one model is its own mean).
    """
    first = arrays[0]
    out_dtype = mean_dtype(a.dtype for a in arrays)
    float32_sum = all(a.dtype == np.float32 for a in arrays)
    work_dtype = out_dtype if float32_sum else _work_dtype(out_dtype)
    order = _order(first)
    result = _result_layer(first.shape, out_dtype, order)
    target = _flat(result, order)
    flats = [_flat(a, order) for a in arrays]
    factors = [work_dtype.type(w) for w in weights]
    divisor = work_dtype.type(total)

    def first_term(acc: NDArray, lo: int, hi: int) -> None:
        if not float32_sum:
            _start_into(acc, flats[0][lo:hi], factors[0])
        elif len(flats) == 1 or factors[0] == 1:
            np.copyto(acc, flats[0][lo:hi])  # as WeightedSum: see its _settle
        else:
            np.multiply(flats[0][lo:hi], factors[0], out=acc)

    def work(start: int, stop: int) -> None:
        acc_block = np.empty(min(BLOCK, stop - start), dtype=work_dtype)
        scratch_block = np.empty_like(acc_block)
        for lo in range(start, stop, BLOCK):
            hi = min(lo + BLOCK, stop)
            acc, scratch = acc_block[: hi - lo], scratch_block[: hi - lo]
            first_term(acc, lo, hi)
            # A spilled result's pages go once read: each term's block as soon as it is
            # folded (after all terms, a block of fifty 40 MB results on each thread
            # held 50 MB of their pages at once).
            release(flats[0][lo:hi])
            for values, factor in zip(flats[1:], factors[1:], strict=True):
                _fold_into(acc, values[lo:hi], factor, scratch)
                release(values[lo:hi])
            if float32_sum and len(flats) == 1:
                np.copyto(target[lo:hi], acc)
            else:
                _mean_into(target[lo:hi], acc, divisor, acc)

    _in_parts(target.size, work)
    return result


def _weighted_mean(results: Sequence[tuple[NDArrays, float]]) -> NDArrays:
    """:func:`aggregate` of models all at hand: layer by layer, block by block."""
    if not results:
        raise RunError("aggregate: expected at least one result, received none")
    shapes = [a.shape for a in results[0][0]]
    for index, (arrays, _) in enumerate(results):
        if [a.shape for a in arrays] != shapes:
            raise RunError(
                f"aggregate: result {index} has layers {[a.shape for a in arrays]}, "
                f"expected {shapes}"
            )
    total: float = 0
    for _, weight in results:
        total += weight
    _check_total(total)
    models, weights = _merge_repeated(results)
    return [
        _mean_of_layer([arrays[layer] for arrays in models], weights, total)
        for layer in range(len(shapes))
    ]


def _merge_repeated(
    results: Sequence[tuple[NDArrays, float]],
) -> tuple[list[NDArrays], list[float]]:
    """The distinct models of ``results`` and their weights: a model given more than once
    (the same list, as SecAgg+ gives every survivor the one aggregate) is read once, with
    its weights summed (``sum_k w_k x = (sum_k w_k) x``, up to rounding)."""
    index: dict[int, int] = {}
    models: list[NDArrays] = []
    weights: list[float] = []
    for arrays, weight in results:
        at = index.setdefault(id(arrays), len(models))
        if at == len(models):
            models.append(arrays)
            weights.append(weight)
        else:
            weights[at] += weight
    return models, weights


def aggregate(results: Iterable[tuple[NDArrays, int]]) -> NDArrays:
    """Weighted mean of models, by number of examples (FedAvg, McMahan et al. 2017).

    ``w = sum_k n_k * w_k / sum_k n_k``. Layers that are float32 in every model are summed
    in float32, ``n_k * w_k`` added in order and the sum divided by the total (Flower
    1.12's ``aggregate``, bit for bit, but that one model is its own mean exactly); other
    layers are accumulated in float64 (complex128) and cast back to the layer's dtype.

    With a list (or other sequence) of results, each block of the mean is summed over all
    models at once in the CPU cache: every input is read once, nothing of a model's size
    is allocated but the result. Any other iterable, e.g. a generator decoding one model
    at a time, is consumed into a compact :class:`WeightedSum`: one model-sized
    accumulator, whatever the number of results. Both give the same bits when each layer
    keeps one dtype in every model and none is float16 (a compact sum keeps float16
    layers as a running mean, against overflow).

    Raises:
        RunError: no results, results of different layouts, or a total of 0 examples.
    """
    if isinstance(results, Sequence):
        return _weighted_mean(results)
    acc = WeightedSum(compact=True)
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


def _layer_dtype(models: Sequence[NDArrays], layer: int) -> np.dtype[Any]:
    """The :func:`mean_dtype` of layer ``layer`` over ``models``."""
    return mean_dtype(m[layer].dtype for m in models)


PART_VALUES = 1 << 21
"""Values (over all models) the coordinate-wise rules stack at a time: 16 MB in float64,
and as much again for the rule's own work (``np.median`` partitions a copy). With 32 MB
parts the heap grew by ~85 MB during a 50 x 40 MB median and the allocator kept it for
the rest of the run: that server peaked at 3.4x the model above the process, 2.6x with
16 MB parts (2.2x with 8 MB, for an aggregation up to a second slower; bench/HISTORY.md).

The robust rules read each coordinate of every model at once; stacking whole layers
would hold every model (in float64: twice a float32 model each). Part by part, they hold
one part of every model, and release the parts of spilled results as they go
(:func:`~stamen.server.spill.release`). Each coordinate's value does not depend on the
parts, so the results are those of the whole-layer rules, to the bit."""


def _parts(models: Sequence[NDArrays], layer: int) -> Iterator[tuple[int, int, NDArray]]:
    """``(lo, hi, stacked)``: values ``lo:hi`` of layer ``layer`` of every model, stacked
    on axis 0 in float64 (complex128), for consecutive parts of the layer.

    The values are those of each layer flattened in one memory order (the first model's),
    so a coordinate has the same index in every model. The stacked array is reused: use
    it before asking for the next part.
    """
    order = _order(models[0][layer])
    flats = [_flat(m[layer], order) for m in models]
    size = flats[0].size
    step = max(1, PART_VALUES // len(models))
    scratch = np.empty(
        (len(models), min(step, size)), dtype=_work_dtype(_layer_dtype(models, layer))
    )
    for lo in range(0, size, step):
        hi = min(lo + step, size)
        stacked = scratch[:, : hi - lo]
        for row, values in zip(stacked, flats, strict=True):
            np.copyto(row, values[lo:hi])
            release(values[lo:hi])
        yield lo, hi, stacked


def _coordinate_wise(models: Sequence[NDArrays], rule: Callable[[NDArray], NDArray]) -> NDArrays:
    """Each layer's ``rule(stacked)`` (a value per coordinate from the stacked values of
    every model, axis 0) in the layer's :func:`mean_dtype`, computed part by part."""
    out: NDArrays = []
    for layer in range(len(models[0])):
        dtype = _layer_dtype(models, layer)
        first = models[0][layer]
        order = _order(first)
        result = _result_layer(first.shape, dtype, order)
        target = _flat(result, order)
        for lo, hi, stacked in _parts(models, layer):
            target[lo:hi] = cast_like(rule(stacked), dtype)
        out.append(result)
    return out


def aggregate_median(results: Sequence[tuple[NDArrays, int]]) -> NDArrays:
    """Coordinate-wise median of the models; the numbers of examples are ignored.

    Raises:
        RunError: no results, or results of different layouts.
    """
    models = _models(results, "aggregate_median")
    return _coordinate_wise(models, lambda stacked: np.median(stacked, axis=0))


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

    def trimmed_mean(stacked: NDArray) -> NDArray:
        ranked = np.sort(stacked, axis=0)
        mean: NDArray = ranked[cut : len(models) - cut].mean(axis=0)
        return mean

    return _coordinate_wise(models, trimmed_mean)


def pairwise_squared_distances(models: Sequence[NDArrays]) -> NDArray:
    """``D[i, j] = ||w_i - w_j||^2`` over all layers, in float64 (read part by part)."""
    count = len(models)
    distances = np.zeros((count, count))
    for layer in range(len(models[0]) if models else 0):
        for _, _, stacked in _parts(models, layer):
            for i in range(count - 1):
                diff = stacked[i + 1 :] - stacked[i]
                if diff.dtype.kind == "c":
                    diff = np.abs(diff)
                squared = np.einsum("ij,ij->i", diff, diff)
                distances[i, i + 1 :] += squared
                distances[i + 1 :, i] += squared
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
        return aggregate([results[i] for i in best])
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

    def closest_to_median(stacked: NDArray) -> NDArray:
        median = np.median(stacked, axis=0)
        closest = np.argsort(np.abs(stacked - median), axis=0, kind="stable")[:beta]
        mean: NDArray = np.take_along_axis(stacked, closest, axis=0).mean(axis=0)
        return mean

    return _coordinate_wise(selected, closest_to_median)


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
