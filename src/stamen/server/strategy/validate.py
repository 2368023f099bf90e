"""Checking client results before aggregation: the one place where bad results are refused.

Every strategy passes its results through here, so a bad result is handled the same way
everywhere: it is **refused** — moved from the results to the failures as an
:class:`InvalidResult` naming the client and the reason, and logged — never averaged in,
and never a crash. A fit result is refused when:

* its status is not OK;
* it reports ``num_examples <= 0``;
* its tensors do not decode as ``.npy`` arrays;
* its arrays do not match the reference layout (the global model's number of arrays and
  their shapes);
* an array is not numeric (bool, integer, floating-point or complex);
* a floating-point array holds NaN or Inf.

A result whose dtypes differ from the global model's is **accepted**, as Flower accepts it:
a client may train in float32 a model that started as float64 zeros, or return float64
weights for an int64 initial model. The aggregate then follows NumPy's type promotion
over the results (see :func:`~stamen.server.strategy.aggregate.aggregate`).

**The reference layout** is the layout of the global model the strategy sent to the
clients (FedAvg records it in ``configure_fit``, and from ``initial_parameters``). When
there is none — ``aggregate_fit`` called without ``configure_fit``, or an empty global
model — the results are checked against each other instead: the shapes shared by the most
results (the earliest on a tie) are the reference, and the results of other layouts are
refused. That costs one more pass over the results' headers.

Decoding makes read-only views over the tensor bytes
(:func:`~stamen.ndarrays.parameters_to_views`), never copies: checking a result reads its
values once (for NaN/Inf) and allocates nothing of its size.

An evaluate result is refused when its status is not OK, it reports ``num_examples < 0``,
or its loss is NaN or Inf. (A client with no test data may report 0 examples: its loss then
weighs nothing.)
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...errors import DecodeError, InvalidResult
from ...messages import Code, EvaluateRes, FitRes, Parameters
from ...ndarrays import parameters_to_views
from ...typing import NDArray, NDArrays
from ..client_proxy import ClientProxy
from ..spill import release
from .strategy import EvaluateFailures, EvaluateResults, FitFailures, FitResults

__all__ = [
    "CheckedFitResults",
    "InvalidResult",
    "ModelLayout",
    "Verdict",
    "collect_refusals",
    "metadata_only",
    "refuse_result",
    "validate_evaluate_results",
    "validate_fit_results",
    "verdict",
]

logger = logging.getLogger("stamen.server")


@dataclass(frozen=True)
class ModelLayout:
    """The number, shapes and dtypes of a model's arrays.

    Results are checked against the number and shapes only (:meth:`mismatch`); the dtypes
    say what the global model was.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]

    @classmethod
    def of(cls, ndarrays: NDArrays) -> ModelLayout:
        """The layout of ``ndarrays``."""
        return cls(tuple(a.shape for a in ndarrays), tuple(a.dtype for a in ndarrays))

    @classmethod
    def of_parameters(cls, parameters: Parameters) -> ModelLayout | None:
        """The layout of NumPy ``parameters``; None if empty or not NumPy ``.npy`` tensors."""
        try:
            ndarrays = parameters_to_views(parameters)  # only the headers are read
        except DecodeError:
            return None
        return cls.of(ndarrays) if ndarrays else None

    def mismatch(self, ndarrays: NDArrays) -> str | None:
        """None if ``ndarrays`` has this layout's number of arrays and shapes, else what
        differs (first difference). Dtypes may differ: they are promoted when aggregating."""
        if len(ndarrays) != len(self.shapes):
            return f"{len(ndarrays)} arrays, expected {len(self.shapes)} (the global model's)"
        for index, (array, shape, dtype) in enumerate(
            zip(ndarrays, self.shapes, self.dtypes, strict=True)
        ):
            if array.shape != shape:
                return (
                    f"array {index} is {array.dtype}{list(array.shape)}, expected "
                    f"{dtype}{list(shape)} (the global model's)"
                )
        return None


_NUMERIC_KINDS = "biufc"
"""NumPy dtype kinds that can be averaged: bool, integers, floating-point, complex."""


def _not_numeric(ndarrays: NDArrays) -> str | None:
    for index, array in enumerate(ndarrays):
        if array.dtype.kind not in _NUMERIC_KINDS:
            return f"array {index} is of dtype {array.dtype}, which cannot be averaged"
    return None


_FINITE_BLOCK = 1 << 16
"""Values checked for NaN/Inf at a time: no temporary of an array's size."""


def _all_finite(array: NDArray) -> bool:
    if array.size <= _FINITE_BLOCK:  # small: one call, no scratch
        finite = bool(np.isfinite(array).all())
        release(array)
        return finite
    flat = array.ravel(order="K")  # a view of a C- or F-contiguous array
    mask = np.empty(min(flat.size, _FINITE_BLOCK), dtype=bool)
    for start in range(0, flat.size, _FINITE_BLOCK):
        block = mask[: min(_FINITE_BLOCK, flat.size - start)]
        np.isfinite(flat[start : start + _FINITE_BLOCK], out=block)
        release(flat[start : start + _FINITE_BLOCK])  # a spilled result's pages go
        if not block.all():
            return False
    return True


def _non_finite(ndarrays: NDArrays) -> str | None:
    for index, array in enumerate(ndarrays):
        if array.dtype.kind in "fc" and not _all_finite(array):  # floating, complex
            nans = int(np.isnan(array).sum())
            infs = int(np.isinf(array).sum())
            return f"array {index} holds {nans} NaN and {infs} Inf values"
    return None


_collector: ContextVar[list[InvalidResult] | None] = ContextVar("stamen_refusals", default=None)


@contextmanager
def collect_refusals() -> Iterator[list[InvalidResult]]:
    """Collect every result refused (:func:`refuse_result`) in this context, in order.

    The server wraps a round's aggregation in it, so that it learns which nodes' results
    were refused and why, whichever strategy refused them, and can tell those nodes.
    """
    refused: list[InvalidResult] = []
    token = _collector.set(refused)
    try:
        yield refused
    finally:
        _collector.reset(token)


def refuse_result(
    server_round: int, proxy: ClientProxy, result: FitRes | EvaluateRes, reason: str
) -> InvalidResult:
    """Log that ``result`` is refused and why; return the failure that stands for it (and
    hand it to :func:`collect_refusals`, if one is collecting)."""
    kind = "fit" if isinstance(result, FitRes) else "evaluate"
    logger.warning(
        "round %s: refusing the %s result of client %s: %s", server_round, kind, proxy.cid, reason
    )
    refusal = InvalidResult(proxy, result, reason)
    collecting = _collector.get()
    if collecting is not None:
        collecting.append(refusal)
    return refusal


def _decode(fit_res: FitRes) -> tuple[NDArrays | None, str | None]:
    """(read-only views, None) or (None, why not), for the checks that need no reference."""
    if fit_res.status.code != Code.OK:
        return None, f"status {fit_res.status.code.name}: {fit_res.status.message}"
    if fit_res.num_examples <= 0:
        return None, f"num_examples={fit_res.num_examples}; a fit result needs at least 1 example"
    try:
        return parameters_to_views(fit_res.parameters), None
    except DecodeError as exc:
        return None, f"parameters do not decode: {exc}"


Verdict = tuple[NDArrays | None, str | None]
"""``(read-only views, None)`` for a valid result, ``(None, why not)`` for a refused one."""


def verdict(fit_res: FitRes, reference: ModelLayout | None) -> Verdict:
    """The checks of one fit result against ``reference`` (if any), without a word in the
    log: :class:`CheckedFitResults` logs and files the refusals."""
    arrays, reason = _decode(fit_res)
    if arrays is None:
        return None, reason
    if reference is not None:
        reason = reference.mismatch(arrays)
        if reason is not None:
            return None, reason
    reason = _not_numeric(arrays) or _non_finite(arrays)
    return (None, reason) if reason is not None else (arrays, None)


def metadata_only(fit_res: FitRes) -> FitRes:
    """``fit_res`` without its tensors (status, num_examples and metrics kept)."""
    empty = Parameters(tensors=[], tensor_type=fit_res.parameters.tensor_type)
    return replace(fit_res, parameters=empty)


class CheckedFitResults:
    """The valid results of a fit round, decoded one at a time as they are iterated.

    Iterating yields ``(proxy, fit_res, ndarrays)`` for each valid result, in order; each
    refused result is logged and appended to :attr:`failures` as an :class:`InvalidResult`.
    Iterate once. The arrays are read-only views over the result's tensor bytes
    (:func:`~stamen.ndarrays.parameters_to_views`): decoding copies nothing, and keeping
    them costs no memory beyond the results themselves. A rule that needs to modify
    them copies them.

    Results may also be checked one by one as they arrive, with :meth:`check` (the
    streaming accumulators of the FedAvg family do so, from an empty ``results``).

    Args:
        server_round: The round, for the log.
        results: The round's results.
        failures: The round's failures; :attr:`failures` starts as a copy.
        reference: The global model's layout; None: the most common layout of ``results``.
        stop_on_refusal: Stop at the first refused result (for ``accept_failures=False``);
            :attr:`stopped` then tells that the round must not be aggregated.
        keep_tensors: False: :attr:`accepted` and :attr:`refused` hold the results without
            their tensors (:func:`metadata_only`), so that the models are not kept alive.
        known: The verdicts given already, as the results arrived (FedAvg's early fold):
            ``known(fit_res)`` is the :func:`verdict` on ``fit_res`` if it is known, else
            None. A known refusal is logged and filed here all the same.

    Attributes:
        failures: The incoming failures, then the refused results.
        accepted: The results yielded so far.
        refused: The refused results.
        stopped: True if iteration stopped at a refused result.
        reference: The layout the results are checked against.
    """

    def __init__(
        self,
        server_round: int,
        results: Sequence[tuple[ClientProxy, FitRes]],
        failures: FitFailures,
        reference: ModelLayout | None,
        *,
        stop_on_refusal: bool = False,
        keep_tensors: bool = True,
        known: Callable[[FitRes], Verdict | None] | None = None,
    ) -> None:
        self.server_round = server_round
        self._known = known
        self._results = results
        self.failures: FitFailures = list(failures)
        self.accepted: FitResults = []
        self.refused: list[InvalidResult] = []
        self.stopped = False
        self._stop_on_refusal = stop_on_refusal
        self._keep_tensors = keep_tensors
        self._iterated = False
        self._verdicts: dict[int, Verdict] = {}
        self.reference = reference if reference is not None else self._majority_layout()

    def _majority_layout(self) -> ModelLayout | None:
        counts: Counter[tuple[tuple[int, ...], ...]] = Counter()
        layouts: dict[tuple[tuple[int, ...], ...], ModelLayout] = {}
        for _, fit_res in self._results:
            arrays, _ = _decode(fit_res)  # views: only the headers are read
            if arrays is not None:
                layout = ModelLayout.of(arrays)
                layouts.setdefault(layout.shapes, layout)
                counts[layout.shapes] += 1
        if not counts:
            return None
        shapes, count = counts.most_common(1)[0]  # most_common keeps first-seen order on ties
        layout = layouts[shapes]
        if len(counts) > 1:
            logger.warning(
                "round %s: no global model to check results against; %d of %d results "
                "share a layout, which is taken as the reference",
                self.server_round,
                count,
                len(self._results),
            )
        return layout

    def _check(self, fit_res: FitRes) -> Verdict:
        """The verdict on ``fit_res``'s parameters, given once per Parameters object: a
        result that carries one already checked (SecAgg+ gives every survivor the one
        aggregate) gets the same arrays, the very same list, without a second look.

        Only while the checked results are kept (``keep_tensors``): they keep each
        Parameters, so its id, alive; a streaming check keeps nothing.
        """
        if not self._keep_tensors:
            return self._verdict(fit_res)
        key = id(fit_res.parameters)
        if key not in self._verdicts:
            self._verdicts[key] = self._verdict(fit_res)
        return self._verdicts[key]

    def _verdict(self, fit_res: FitRes) -> Verdict:
        known = None if self._known is None else self._known(fit_res)
        return known if known is not None else verdict(fit_res, self.reference)

    def check(self, proxy: ClientProxy, fit_res: FitRes) -> NDArrays | None:
        """Check one result: its arrays (read-only views) if valid, else None.

        A valid result is appended to :attr:`accepted`; a refused one is logged and
        appended to :attr:`refused` and :attr:`failures` (and sets :attr:`stopped` with
        ``stop_on_refusal``).
        """
        arrays, reason = self._check(fit_res)
        kept = fit_res if self._keep_tensors else metadata_only(fit_res)
        if arrays is None:
            refusal = refuse_result(self.server_round, proxy, kept, reason or "invalid")
            self.refused.append(refusal)
            self.failures.append(refusal)
            if self._stop_on_refusal:
                self.stopped = True
            return None
        self.accepted.append((proxy, kept))
        return arrays

    def __iter__(self) -> Iterator[tuple[ClientProxy, FitRes, NDArrays]]:
        if self._iterated:
            raise RuntimeError("CheckedFitResults can be iterated only once")
        self._iterated = True
        for proxy, fit_res in self._results:
            arrays = self.check(proxy, fit_res)
            if self.stopped:
                return
            if arrays is not None:
                yield proxy, fit_res, arrays


def validate_fit_results(
    server_round: int,
    results: Sequence[tuple[ClientProxy, FitRes]],
    failures: FitFailures,
    reference: ModelLayout | NDArrays | None,
) -> tuple[list[tuple[ClientProxy, FitRes, NDArrays]], FitFailures]:
    """Decode and check every fit result at once (see the module docstring).

    For rules that need all models anyway; streaming rules iterate
    :class:`CheckedFitResults` instead.

    Returns:
        ``(valid, failures)``: the valid results with their decoded arrays, and the
        incoming failures followed by an :class:`InvalidResult` per refused result.
    """
    layout = ModelLayout.of(reference) if isinstance(reference, list) else reference
    checked = CheckedFitResults(server_round, results, failures, layout)
    valid = list(checked)
    return valid, checked.failures


def validate_evaluate_results(
    server_round: int,
    results: Sequence[tuple[ClientProxy, EvaluateRes]],
    failures: EvaluateFailures,
) -> tuple[EvaluateResults, EvaluateFailures]:
    """Refuse evaluate results with a non-OK status, ``num_examples < 0`` or a NaN/Inf loss.

    Returns:
        ``(valid, failures)`` as :func:`validate_fit_results`.
    """
    valid: EvaluateResults = []
    out_failures: EvaluateFailures = list(failures)
    for proxy, res in results:
        reason = None
        if res.status.code != Code.OK:
            reason = f"status {res.status.code.name}: {res.status.message}"
        elif res.num_examples < 0:
            reason = f"num_examples={res.num_examples} is negative"
        elif not math.isfinite(res.loss):
            reason = f"loss is {res.loss}"
        if reason is None:
            valid.append((proxy, res))
        else:
            out_failures.append(refuse_result(server_round, proxy, res, reason))
    return valid, out_failures
