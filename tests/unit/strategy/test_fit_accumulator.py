"""The streaming fit accumulators give what aggregate_fit gives, and keep no client model.

``Strategy.fit_accumulator`` lets a server fold each fit result in as it arrives. For the
FedAvg family it must give the same round (aggregate, metrics, refusals, state updates) as
``aggregate_fit`` on the same results and failures; strategies whose rule needs all the
results must not offer one.
"""

from __future__ import annotations

import logging
import sys
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stamen.errors import DecodeError
from stamen.messages import Code, FitRes, Parameters, Status
from stamen.server.client_proxy import ClientProxy
from stamen.server.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FaultTolerantFedAvg,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedYogi,
    FitAccumulator,
    Krum,
    QFedAvg,
    Strategy,
    weighted_average,
)
from stamen.server.strategy.validate import CheckedFitResults
from stamen.typing import Metrics, NDArrays

SHAPES = [(4, 3), (5,), (1,)]
GLOBAL = [np.zeros(shape, np.float32) for shape in SHAPES]

Results = list[tuple[ClientProxy, FitRes]]
Failures = list[tuple[ClientProxy, FitRes] | BaseException]


def _loss(server_round: int, ndarrays: Any, config: Any) -> tuple[float, dict[str, Any]]:
    return 1.0, {}


def summarize(pairs: list[tuple[int, Metrics]]) -> Metrics:
    """A metrics hook whose output depends on every (num_examples, metrics) it is given."""
    return {
        "count": len(pairs),
        "examples": sum(n for n, _ in pairs),
        "acc": ",".join(f"{n}:{m.get('acc', '-')}" for n, m in pairs),
    }


class AtLeastThree(FedAvg):
    """A user rule on top of FedAvg's aggregation: at least 3 accepted results."""

    def refuse_round(self, checked: CheckedFitResults) -> str | None:
        if len(checked.accepted) < 3:
            return f"only {len(checked.accepted)} accepted result(s), expected at least 3"
        return super().refuse_round(checked)


STREAMING: dict[str, Callable[[Parameters, bool], FedAvg]] = {
    "FedAvg": lambda init, accept: FedAvg(
        accept_failures=accept, fit_metrics_aggregation_fn=summarize
    ),
    "FedProx": lambda init, accept: FedProx(
        proximal_mu=0.1, accept_failures=accept, fit_metrics_aggregation_fn=weighted_average
    ),
    "FedAvgM": lambda init, accept: FedAvgM(
        server_momentum=0.5,
        initial_parameters=init,
        accept_failures=accept,
        fit_metrics_aggregation_fn=summarize,
    ),
    "FedAdam": lambda init, accept: FedAdam(initial_parameters=init, accept_failures=accept),
    "FedYogi": lambda init, accept: FedYogi(
        initial_parameters=init, accept_failures=accept, fit_metrics_aggregation_fn=summarize
    ),
    "FaultTolerantFedAvg": lambda init, accept: FaultTolerantFedAvg(
        min_completion_rate_fit=0.6, fit_metrics_aggregation_fn=summarize
    ),
    "AtLeastThree": lambda init, accept: AtLeastThree(
        accept_failures=accept, fit_metrics_aggregation_fn=summarize
    ),
}

BAD_KINDS = [
    "NaN",
    "Inf",
    "wrong shape",
    "wrong count",
    "dtype change",  # accepted (promoted), as Flower accepts it
    "zero examples",
    "negative examples",
    "undecodable",
]


def random_model(rng: np.random.Generator, base: NDArrays) -> NDArrays:
    return [np.asarray(b + rng.normal(size=b.shape), dtype=np.float32) for b in base]


def bad_result(kit: Any, rng: np.random.Generator, kind: str, base: NDArrays) -> FitRes:
    arrays = random_model(rng, base)
    num_examples = int(rng.integers(1, 50))
    if kind == "NaN":
        arrays[0][0, 1] = np.nan
    elif kind == "Inf":
        arrays[1][2] = -np.inf
    elif kind == "wrong shape":
        arrays[0] = np.zeros((3, 4), np.float32)
    elif kind == "wrong count":
        arrays = arrays[:2]
    elif kind == "dtype change":
        arrays[1] = arrays[1].astype(np.float64)
    elif kind == "zero examples":
        num_examples = 0
    elif kind == "negative examples":
        num_examples = -int(rng.integers(1, 5))
    elif kind == "undecodable":
        return FitRes(Status(Code.OK, ""), Parameters([b"\x93NUMPY garbage"], "numpy.ndarray"), 3)
    return kit.fit_res(arrays, num_examples, {"acc": float(rng.random())})


def random_round(
    kit: Any, rng: np.random.Generator, base: NDArrays, server_round: int
) -> tuple[Results, Failures]:
    """0-7 results, about a third of them bad, and 0-2 failures."""
    results: Results = []
    for index in range(int(rng.integers(0, 8))):
        proxy = kit.proxy(f"r{server_round}c{index}")
        if rng.random() < 0.35:
            kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
            results.append((proxy, bad_result(kit, rng, kind, base)))
        else:
            metrics = {"acc": float(rng.random())}
            res = kit.fit_res(random_model(rng, base), int(rng.integers(1, 1000)), metrics)
            results.append((proxy, res))
    failures: Failures = []
    for index in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
        if rng.random() < 0.5:
            failures.append(TimeoutError(f"client f{index} timed out"))
        else:
            error = FitRes(Status(Code.CLIENT_ERROR, "boom"), Parameters([], ""), 0)
            failures.append((kit.proxy(f"f{index}"), error))
    return results, failures


def changes_dtype(kit: Any, res: FitRes, global_model: Parameters) -> bool:
    """True if ``res`` decodes to arrays of other dtypes than the global model's."""
    try:
        arrays = kit.arrays(res.parameters)
    except DecodeError:
        return False
    return [a.dtype for a in arrays] != [a.dtype for a in kit.arrays(global_model)]


def streamed(
    strategy: Strategy, server_round: int, results: Results, failures: Failures
) -> tuple[Parameters | None, dict[str, Any]]:
    accumulator = strategy.fit_accumulator(server_round)
    assert accumulator is not None
    for proxy, res in results:
        accumulator.add(proxy, res)
    return accumulator.finish(failures)


def assert_same_round(
    kit: Any,
    got: tuple[Parameters | None, dict[str, Any]],
    expected: tuple[Parameters | None, dict[str, Any]],
    *,
    exact: bool = True,
) -> None:
    assert got[1] == expected[1]
    if expected[0] is None:
        assert got[0] is None
        return
    assert got[0] is not None
    for a, b in zip(kit.arrays(got[0]), kit.arrays(expected[0]), strict=True):
        assert a.dtype == b.dtype
        if a.dtype.kind == "f" and a.dtype.itemsize <= 4:
            # Streaming keeps float32/float16 layers as a running mean in their own dtype
            # (each step rounded once): within a few units in the last place of the
            # float64 sum.
            eps = float(np.finfo(a.dtype).eps)
            np.testing.assert_allclose(a, b, rtol=8 * eps, atol=8 * eps)
        elif exact:
            # Float64 sums, the same values folded in the same order: the same bits.
            np.testing.assert_array_equal(a, b)
        else:
            # A float64 result after float32 ones: the running float32 mean so far became
            # a float64 sum (m * N), so the float32 rounding of the mean stays in.
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(STREAMING))
@pytest.mark.parametrize("accept_failures", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_accumulator_equals_aggregate_fit_on_random_rounds(
    kit: Any, name: str, accept_failures: bool, seed: int, caplog: Any
) -> None:
    """Four rounds of random results (with refused ones and failures) give the same
    aggregates, metrics and server-side state through the accumulator as through
    aggregate_fit — and with accept_failures=True the same log."""
    rng = np.random.default_rng(seed)
    init = kit.params(GLOBAL)
    listed, streaming = (STREAMING[name](init, accept_failures) for _ in range(2))
    manager = kit.manager(8)
    global_listed = global_streaming = init
    for server_round in range(1, 5):
        listed.configure_fit(server_round, global_listed, manager)
        streaming.configure_fit(server_round, global_streaming, manager)
        results, failures = random_round(kit, rng, kit.arrays(global_listed), server_round)
        with caplog.at_level(logging.WARNING, logger="stamen.server"):
            caplog.clear()
            expected = listed.aggregate_fit(server_round, results, failures)
            listed_log = [r.getMessage() for r in caplog.records]
            caplog.clear()
            got = streamed(streaming, server_round, results, failures)
            streamed_log = [r.getMessage() for r in caplog.records]
        changes = any(changes_dtype(kit, res, global_listed) for _, res in results)
        assert_same_round(kit, got, expected, exact=not changes)
        if accept_failures or not failures:
            assert streamed_log == listed_log
        global_listed = expected[0] or global_listed
        global_streaming = got[0] or global_streaming


def test_accumulator_rules_on_handpicked_rounds(kit: Any) -> None:
    """The rules of aggregate_fit, case by case: no results, a refusal or a failure with
    accept_failures=False, all results refused, a completion rate high or too low, a user's
    refuse_round."""
    good = [kit.fit_res([np.full(s, k, np.float32) for s in SHAPES], k) for k in (1, 2, 3)]
    nan = kit.fit_res([np.full(s, np.nan, np.float32) for s in SHAPES], 4)
    zero = kit.fit_res(GLOBAL, 0)
    timeout = TimeoutError("late")
    strict = lambda: FedAvg(accept_failures=False)  # noqa: E731
    rate_75 = lambda: FaultTolerantFedAvg(min_completion_rate_fit=0.75)  # noqa: E731
    rate_80 = lambda: FaultTolerantFedAvg(min_completion_rate_fit=0.8)  # noqa: E731
    # (strategy, results, failures, whether the round is aggregated)
    cases: list[tuple[Callable[[], FedAvg], list[FitRes], Failures, bool]] = [
        (FedAvg, [], [], False),
        (FedAvg, [], [timeout], False),
        (FedAvg, good, [], True),
        (FedAvg, good, [timeout], True),
        (FedAvg, [nan, zero], [], False),
        (FedAvg, [good[0], nan, good[1]], [], True),
        (strict, [good[0], nan, good[1]], [], False),
        (strict, good, [timeout], False),
        (strict, [nan], [timeout], False),
        (rate_75, [*good, nan], [], True),
        (rate_80, [*good, nan], [], False),
        (rate_80, good, [timeout], False),
        (AtLeastThree, [good[0], nan, good[1]], [], False),
        (AtLeastThree, good, [timeout], True),
    ]
    for make, fit_results, failures, aggregated in cases:
        results = [(kit.proxy(f"c{i}"), res) for i, res in enumerate(fit_results)]
        listed, streaming = make(), make()
        for strategy in (listed, streaming):
            strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(4))
        expected = listed.aggregate_fit(1, results, failures)
        assert (expected[0] is not None) == aggregated
        assert_same_round(kit, streamed(streaming, 1, results, failures), expected)


def test_accumulator_logs_why_a_round_is_not_aggregated(kit: Any, caplog: Any) -> None:
    """The refusals, the refused round and the round without a valid result are logged."""
    strategy = FaultTolerantFedAvg(min_completion_rate_fit=0.8)
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(2))
    nan = kit.fit_res([np.full(s, np.nan, np.float32) for s in SHAPES], 4)
    results = [(kit.proxy("ok"), kit.fit_res(GLOBAL, 1)), (kit.proxy("bad"), nan)]
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        assert streamed(strategy, 1, results, []) == (None, {})
    assert "round 1: refusing the fit result of client bad: array 0 holds" in caplog.text
    assert "not aggregating: completion rate 0.5" in caplog.text
    caplog.clear()
    strategy = FedAvg()
    strategy.configure_fit(2, kit.params(GLOBAL), kit.manager(2))
    with caplog.at_level(logging.ERROR, logger="stamen.server"):
        assert streamed(strategy, 2, [(kit.proxy("z"), kit.fit_res(GLOBAL, 0))], []) == (None, {})
    assert "no valid result to aggregate: 1 of 1 result(s) were refused" in caplog.text


class OwnAggregateFit(FedAvg):
    def aggregate_fit(
        self, server_round: int, results: Results, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Any]]:
        return super().aggregate_fit(server_round, results, failures)


class OwnRule(FedAvg):
    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays | None:
        return super().aggregate_checked(server_round, checked)


def _instance_override() -> FedAvg:
    strategy = FedAvg()
    strategy.aggregate_checked = lambda server_round, checked: None  # type: ignore[method-assign]
    return strategy


NOT_STREAMING: dict[str, Callable[[Parameters], Strategy]] = {
    "FedMedian": lambda init: FedMedian(),
    "FedTrimmedAvg": lambda init: FedTrimmedAvg(beta=0.1),
    "Krum": lambda init: Krum(num_clients_to_keep=2),
    "Bulyan": lambda init: Bulyan(),
    "QFedAvg": lambda init: QFedAvg(evaluate_fn=_loss),
    "FedXgbBagging": lambda init: FedXgbBagging(),
    "DPServerFixed": lambda init: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), 0.0, 10.0, 3
    ),
    "user aggregate_fit": lambda init: OwnAggregateFit(),
    "user aggregate_checked": lambda init: OwnRule(),
    "instance aggregate_checked": lambda init: _instance_override(),
}


@pytest.mark.parametrize("name", list(NOT_STREAMING))
def test_rules_that_need_all_results_offer_no_accumulator(kit: Any, name: str) -> None:
    """A strategy whose aggregation is not FedAvg's own (built in or a user's override,
    even on the instance) keeps the list-based aggregate_fit."""
    strategy = NOT_STREAMING[name](kit.params(GLOBAL))
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(4))
    assert strategy.fit_accumulator(1) is None


@pytest.mark.parametrize("name", list(STREAMING))
def test_the_fedavg_family_offers_an_accumulator(kit: Any, name: str) -> None:
    strategy = STREAMING[name](kit.params(GLOBAL), True)
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(4))
    accumulator: FitAccumulator | None = strategy.fit_accumulator(1)
    assert accumulator is not None


def test_no_accumulator_without_a_global_model(kit: Any) -> None:
    """Without a global model the results are checked against each other: all are needed."""
    assert FedAvg().fit_accumulator(1) is None
    strategy = FedAvg()
    strategy.configure_fit(1, kit.params([]), kit.manager(2))
    assert strategy.fit_accumulator(1) is None
    assert Strategy.fit_accumulator(FedAvg(), 1) is None  # the base class's default


def test_accumulator_keeps_no_reference_to_results(kit: Any) -> None:
    """Neither an accepted nor a refused result (its FitRes, its tensor bytes) is referenced
    by the accumulator once add returns; finish still has every metric it needs."""
    strategy = FedAvg(fit_metrics_aggregation_fn=summarize)
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(2))
    accumulator = strategy.fit_accumulator(1)
    assert accumulator is not None
    good = kit.fit_res([np.full(s, 2.0, np.float32) for s in SHAPES], 3, {"acc": 0.5})
    nan = kit.fit_res([np.full(s, np.nan, np.float32) for s in SHAPES], 4, {"acc": 0.1})
    for res in (good, nan):
        before = [sys.getrefcount(res)] + [sys.getrefcount(t) for t in res.parameters.tensors]
        accumulator.add(kit.proxy("c"), res)
        after = [sys.getrefcount(res)] + [sys.getrefcount(t) for t in res.parameters.tensors]
        assert after == before
    parameters, metrics = accumulator.finish([])
    assert metrics == {"count": 1, "examples": 3, "acc": "3:0.5"}
    for array in kit.arrays(parameters):
        np.testing.assert_array_equal(array, np.full_like(array, 2.0))


def test_accumulator_holds_one_model_however_many_results(kit: Any) -> None:
    """Results added and dropped one by one: the peak memory is about the float64 sum and
    one result, not the round's results."""
    layer = np.zeros(1 << 20, np.float32)  # 4 MB
    model_bytes = layer.nbytes
    strategy = FedAvg()
    strategy.configure_fit(1, kit.params([layer]), kit.manager(2))
    tracemalloc.start()
    try:
        accumulator = strategy.fit_accumulator(1)
        assert accumulator is not None
        for k in range(12):
            accumulator.add(kit.proxy(f"c{k}"), kit.fit_res([np.full_like(layer, k)], 1))
        parameters, _ = accumulator.finish([])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * model_bytes  # 12 results would be 12 models
    np.testing.assert_array_equal(kit.arrays(parameters)[0], np.full_like(layer, 5.5))


def test_accumulator_is_used_once(kit: Any) -> None:
    strategy = FedAvg()
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(2))
    accumulator = strategy.fit_accumulator(1)
    assert accumulator is not None
    accumulator.add(kit.proxy("c"), kit.fit_res(GLOBAL, 1))
    assert accumulator.finish([]) != (None, {})
    with pytest.raises(RuntimeError, match="finished"):
        accumulator.add(kit.proxy("c"), kit.fit_res(GLOBAL, 1))
    with pytest.raises(RuntimeError, match="finished"):
        accumulator.finish([])


def test_accumulator_accepts_results_from_several_threads(kit: Any) -> None:
    """Results added concurrently are all folded in (small integers: any order is exact)."""
    strategy = FedAvg(fit_metrics_aggregation_fn=summarize)
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(2))
    accumulator = strategy.fit_accumulator(1)
    assert accumulator is not None

    def feed(offset: int) -> None:
        for k in range(offset, 40, 4):
            res = kit.fit_res([np.full(s, k, np.float32) for s in SHAPES], k + 1)
            accumulator.add(kit.proxy(f"c{k}"), res)

    threads = [threading.Thread(target=feed, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parameters, metrics = accumulator.finish([])
    weights = np.arange(1, 41)
    expected = float(np.sum(weights * (weights - 1)) / np.sum(weights))
    assert metrics["count"] == 40
    for array in kit.arrays(parameters):
        np.testing.assert_allclose(array, np.full_like(array, expected), rtol=1e-6)
