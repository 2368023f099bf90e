"""Bad client results are refused (logged, counted as failures), never averaged in or a crash."""

from __future__ import annotations

import importlib
import logging
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stamen.messages import Code, FitRes, Parameters, Status
from stamen.server.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FaultTolerantFedAvg,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedOpt,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    InvalidResult,
    Krum,
    QFedAvg,
    Strategy,
)
from stamen.server.strategy.validate import (
    CheckedFitResults,
    ModelLayout,
    validate_evaluate_results,
    validate_fit_results,
)

GLOBAL = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]


def model(value: float) -> list[np.ndarray]:
    return [np.full((2, 2), value, np.float32), np.full(3, value, np.float32)]


BAD_RESULTS: dict[str, Callable[[Any], FitRes]] = {
    "wrong shape": lambda kit: kit.fit_res([np.zeros((2, 3), np.float32), GLOBAL[1]], 5),
    "wrong count": lambda kit: kit.fit_res([GLOBAL[0]], 5),
    "not numeric": lambda kit: kit.fit_res([np.full((2, 2), "a"), GLOBAL[1]], 5),
    "NaN": lambda kit: kit.fit_res([np.full((2, 2), np.nan, np.float32), GLOBAL[1]], 5),
    "Inf": lambda kit: kit.fit_res([GLOBAL[0], np.array([1, -np.inf, 0], np.float32)], 5),
    "zero examples": lambda kit: kit.fit_res(model(1.0), 0),
    "negative examples": lambda kit: kit.fit_res(model(1.0), -3),
    "undecodable": lambda kit: FitRes(
        Status(Code.OK, ""), Parameters([b"not npy", b"x"], "numpy.ndarray"), 5
    ),
    "error status": lambda kit: FitRes(
        Status(Code.CLIENT_ERROR, "boom"), kit.params(model(1.0)), 5
    ),
}

REASONS = {
    "wrong shape": "array 0 is float32[2, 3], expected float32[2, 2]",
    "wrong count": "1 arrays, expected 2",
    "not numeric": "array 0 is of dtype <U1, which cannot be averaged",
    "NaN": "array 0 holds 4 NaN and 0 Inf values",
    "Inf": "array 1 holds 0 NaN and 1 Inf values",
    "zero examples": "num_examples=0",
    "negative examples": "num_examples=-3",
    "undecodable": "parameters do not decode",
    "error status": "status CLIENT_ERROR: boom",
}


@pytest.mark.parametrize("bad", list(BAD_RESULTS))
def test_checks_refuse_each_kind_of_bad_result(kit: Any, bad: str, caplog: Any) -> None:
    """Each kind of bad result is refused with its reason logged and returned as a failure."""
    results = [
        (kit.proxy("good"), kit.fit_res(model(1.0), 2)),
        (kit.proxy("bad"), BAD_RESULTS[bad](kit)),
    ]
    earlier = RuntimeError("timeout")
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        valid, failures = validate_fit_results(3, results, [earlier], GLOBAL)
    assert [p.cid for p, _, _ in valid] == ["good"]
    assert failures[0] is earlier
    refused = failures[1]
    assert isinstance(refused, InvalidResult)
    assert refused.proxy.cid == "bad"
    assert REASONS[bad] in refused.reason
    assert f"round 3: refusing the fit result of client bad: {refused.reason}" in caplog.text


def test_without_reference_the_most_common_layout_wins(kit: Any, caplog: Any) -> None:
    """No global model: results are checked against the layout most of them share."""
    odd = kit.fit_res([np.zeros(7, np.float32)], 1)
    results = [(kit.proxy("odd"), odd)] + [
        (kit.proxy(f"c{i}"), kit.fit_res(model(float(i)), 1)) for i in range(2)
    ]
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        valid, failures = validate_fit_results(1, results, [], None)
    assert [p.cid for p, _, _ in valid] == ["c0", "c1"]
    assert [f.proxy.cid for f in failures if isinstance(f, InvalidResult)] == ["odd"]
    assert "2 of 3 results share a layout" in caplog.text


def test_checked_results_decode_lazily_and_can_stop(kit: Any) -> None:
    """CheckedFitResults yields valid results one by one; stop_on_refusal stops at the first bad."""
    results = kit.results([(model(1.0), 1), (model(np.nan), 1), (model(2.0), 1)])
    checked = CheckedFitResults(1, results, [], ModelLayout.of(GLOBAL), stop_on_refusal=True)
    assert [p.cid for p, _, _ in checked] == ["c0"]
    assert checked.stopped
    assert len(checked.failures) == 1
    with pytest.raises(RuntimeError, match="only once"):
        list(checked)


def test_results_sharing_parameters_are_checked_once(kit: Any) -> None:
    """Results that carry one Parameters object (SecAgg+'s survivors, each with the
    aggregate) get the same arrays, one list, each result still counted; a bad shared one
    is refused for each result that carries it."""
    shared, bad = kit.params(model(2.0)), kit.params(model(np.nan))
    results = [
        (kit.proxy(cid), FitRes(Status(Code.OK, ""), params, n, {}))
        for cid, params, n in [("a", shared, 1), ("b", bad, 1), ("c", shared, 3), ("d", bad, 2)]
    ]
    valid, failures = validate_fit_results(1, results, [], GLOBAL)
    assert [p.cid for p, _, _ in valid] == ["a", "c"]
    assert valid[0][2] is valid[1][2]
    assert [f.proxy.cid for f in failures if isinstance(f, InvalidResult)] == ["b", "d"]
    streaming = CheckedFitResults(1, results, [], ModelLayout.of(GLOBAL), keep_tensors=False)
    first, second = (streaming.check(p, r) for p, r in (results[0], results[2]))
    assert first is not None and second is not None and first is not second
    np.testing.assert_array_equal(first[0], second[0])


def test_evaluate_results_refuse_negative_examples_and_bad_losses(kit: Any) -> None:
    """Evaluate results with num_examples < 0 or a NaN/Inf loss are refused; 0 examples pass."""
    results = [
        (kit.proxy("ok"), kit.eval_res(0.5, 3)),
        (kit.proxy("empty"), kit.eval_res(0.0, 0)),
        (kit.proxy("neg"), kit.eval_res(0.5, -1)),
        (kit.proxy("nan"), kit.eval_res(float("nan"), 3)),
    ]
    valid, failures = validate_evaluate_results(1, results, [])
    assert [p.cid for p, _ in valid] == ["ok", "empty"]
    assert [f.proxy.cid for f in failures if isinstance(f, InvalidResult)] == ["neg", "nan"]


def _loss(server_round: int, ndarrays: Any, config: Any) -> tuple[float, dict[str, Any]]:
    return 1.0, {}


STRATEGIES: dict[str, Callable[[Parameters], Strategy]] = {
    "FedAvg": lambda init: FedAvg(),
    "FaultTolerantFedAvg": lambda init: FaultTolerantFedAvg(),
    "FedAvgM": lambda init: FedAvgM(server_momentum=0.5, initial_parameters=init),
    "FedProx": lambda init: FedProx(proximal_mu=0.1),
    "FedMedian": lambda init: FedMedian(),
    "FedTrimmedAvg": lambda init: FedTrimmedAvg(beta=0.1),
    "Krum": lambda init: Krum(num_clients_to_keep=2),
    "Bulyan": lambda init: Bulyan(),
    "QFedAvg": lambda init: QFedAvg(evaluate_fn=_loss),
    "FedOpt": lambda init: FedOpt(initial_parameters=init),
    "FedAdagrad": lambda init: FedAdagrad(initial_parameters=init),
    "FedAdam": lambda init: FedAdam(initial_parameters=init),
    "FedYogi": lambda init: FedYogi(initial_parameters=init),
    "DPServerFixed": lambda init: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), 0.0, 10.0, 3
    ),
    "DPClientFixed": lambda init: DifferentialPrivacyClientSideFixedClipping(
        FedAvg(), 0.0, 10.0, 3
    ),
    "DPServerAdaptive": lambda init: DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), 0.0, 3
    ),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("bad", ["wrong shape", "NaN"])
def test_every_strategy_refuses_a_bad_result_and_the_round_completes(
    kit: Any, name: str, bad: str
) -> None:
    """Fed 3 good results and one with a wrong shape or a NaN, every strategy finishes the
    round without raising; the bad result is never averaged in (the DP wrappers refuse the
    whole round, as any failure does for them)."""
    strategy = STRATEGIES[name](kit.params(GLOBAL))
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(4))
    results = kit.results([(model(1.0), 1), (model(2.0), 1), (model(3.0), 1)])
    results.insert(1, (kit.proxy("bad"), BAD_RESULTS[bad](kit)))
    parameters, _ = strategy.aggregate_fit(1, results, [])
    if name.startswith("DP"):
        assert parameters is None
        return
    out = kit.arrays(parameters)
    assert [a.shape for a in out] == [(2, 2), (3,)]
    assert all(np.isfinite(a).all() for a in out)


def test_fedavg_ignores_the_refused_result_exactly(kit: Any, caplog: Any) -> None:
    """FedAvg of [1] x1 and [3] x3 with a NaN result in between is exactly 2.5 everywhere;
    the metrics hook sees only the accepted results."""
    seen: list[list[tuple[int, Any]]] = []
    strategy = FedAvg(
        fit_metrics_aggregation_fn=lambda m: (seen.append(m), {"n": len(m)})[1],
    )
    strategy.configure_fit(1, kit.params(GLOBAL), kit.manager(3))
    results = kit.results(
        [(model(1.0), 1), (model(np.nan), 100), (model(3.0), 3)],
        metrics=[{"a": 1}, {"a": 2}, {"a": 3}],
    )
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        parameters, metrics = strategy.aggregate_fit(1, results, [])
    for array in kit.arrays(parameters):
        np.testing.assert_array_equal(array, np.full_like(array, 2.5))
    assert metrics == {"n": 2}
    assert seen == [[(1, {"a": 1}), (3, {"a": 3})]]
    assert "refusing the fit result of client c1" in caplog.text


def test_all_results_with_zero_examples_give_a_clear_error(kit: Any, caplog: Any) -> None:
    """When every client reports 0 examples nothing divides by zero: the round keeps the
    old model and the log says why."""
    strategy = FedAvg()
    results = kit.results([(model(1.0), 0), (model(2.0), 0)])
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        assert strategy.aggregate_fit(1, results, []) == (None, {})
    assert "num_examples=0; a fit result needs at least 1 example" in caplog.text
    assert "no valid result to aggregate: 2 of 2 result(s) were refused" in caplog.text


def test_accept_failures_false_refuses_rounds_with_failures_or_refusals(kit: Any) -> None:
    """accept_failures=False: a failure, or a result refused by the checks, stops the round."""
    strategy = FedAvg(accept_failures=False)
    good = kit.results([(model(1.0), 1), (model(2.0), 1)])
    assert strategy.aggregate_fit(1, good, [RuntimeError("x")]) == (None, {})
    with_bad = [*good, (kit.proxy("bad"), BAD_RESULTS["NaN"](kit))]
    assert strategy.aggregate_fit(1, with_bad, []) == (None, {})
    np.testing.assert_array_equal(
        kit.arrays(strategy.aggregate_fit(1, good, [])[0])[1], np.full(3, 1.5, np.float32)
    )


def test_accept_failures_false_refuses_bad_evaluations(kit: Any) -> None:
    """accept_failures=False applies to refused evaluate results too; True averages the rest."""
    results = [
        (kit.proxy("a"), kit.eval_res(1.0, 1)),
        (kit.proxy("b"), kit.eval_res(float("inf"), 1)),
    ]
    assert FedAvg(accept_failures=False).aggregate_evaluate(1, results, []) == (None, {})
    assert FedAvg().aggregate_evaluate(1, results, []) == (1.0, {})


def test_reference_comes_from_initial_parameters_then_configure_fit(kit: Any) -> None:
    """The global model's layout is the reference: from initial_parameters, then from the
    model of each configure_fit."""
    strategy = FedAvg(initial_parameters=kit.params(GLOBAL))
    other = [np.zeros(5, np.float32)]
    results = kit.results([(other, 1), (other, 1)])
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    strategy.configure_fit(2, kit.params(other), kit.manager(2))
    assert kit.arrays(strategy.aggregate_fit(2, results, [])[0])[0].shape == (5,)


def test_fedavg_memory_does_not_grow_with_the_number_of_results(kit: Any) -> None:
    """FedAvg's extra memory while aggregating 40 results of 1 MB stays within a few models
    (a running sum). FedMedian reads every result at once, a part of each at a time: its
    peak is its parts' (two stacks of PART_VALUES float64 values) and a few models, not
    the 40 MB of results."""
    layer = np.ones(250_000, np.float32)  # 1 MB
    results = kit.results([([layer * (i % 3)], 1) for i in range(40)])
    model_bytes = layer.nbytes

    def peak(strategy: Strategy) -> int:
        strategy.configure_fit(1, kit.params([layer]), kit.manager(2))
        tracemalloc.start()
        try:
            parameters, _ = strategy.aggregate_fit(1, results, [])
            _, top = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert parameters is not None
        return top

    assert peak(FedAvg()) < 10 * model_bytes
    parts = 2 * importlib.import_module("stamen.server.strategy.aggregate").PART_VALUES * 8
    assert peak(FedMedian()) < parts + 5 * model_bytes < 40 * model_bytes


def test_results_of_another_dtype_than_the_global_model_are_averaged(kit: Any) -> None:
    """float64 initial zeros with float32 clients (scikit-learn's coefficients): the results
    are averaged, as Flower averages them, into a float32 model; through aggregate_fit and
    through the server's streaming accumulator alike."""
    for streaming in (False, True):
        strategy = FedAvg(initial_parameters=kit.params([a.astype(np.float64) for a in GLOBAL]))
        strategy.configure_fit(1, strategy.initial_parameters, kit.manager(2))
        results = kit.results([(model(1.0), 1), (model(4.0), 2)])
        if streaming:
            accumulator = strategy.fit_accumulator(1)
            assert accumulator is not None
            for proxy, res in results:
                accumulator.add(proxy, res)
            parameters, _ = accumulator.finish([])
        else:
            parameters, _ = strategy.aggregate_fit(1, results, [])
        arrays = kit.arrays(parameters)
        assert [a.dtype for a in arrays] == [np.float32, np.float32]
        np.testing.assert_array_equal(arrays[0], np.full((2, 2), 3.0, np.float32))


def test_float64_results_of_an_int64_model_give_a_float64_model(kit: Any) -> None:
    """An int64 initial model and float64 results: the mean is float64, not refused."""
    for streaming in (False, True):
        initial = [np.zeros((2, 2), np.int64), np.zeros(3, np.int64)]
        strategy = FedAvg(initial_parameters=kit.params(initial))
        strategy.configure_fit(1, strategy.initial_parameters, kit.manager(2))
        results = kit.results(
            [([np.full((2, 2), 0.5), np.full(3, 1.0)], 1), ([np.full((2, 2), 2.0), np.ones(3)], 1)]
        )
        if streaming:
            accumulator = strategy.fit_accumulator(1)
            assert accumulator is not None
            for proxy, res in results:
                accumulator.add(proxy, res)
            parameters, _ = accumulator.finish([])
        else:
            parameters, _ = strategy.aggregate_fit(1, results, [])
        arrays = kit.arrays(parameters)
        assert [a.dtype for a in arrays] == [np.float64, np.float64]
        np.testing.assert_array_equal(arrays[0], np.full((2, 2), 1.25))


def test_mixed_result_dtypes_follow_numpy_promotion(kit: Any) -> None:
    """float32 and float64 results of one layer: a float64 mean (NumPy's promotion, as in
    Flower's aggregate), within 1e-6 through the streaming accumulator's running mean."""
    for streaming in (False, True):
        strategy = FedAvg(initial_parameters=kit.params(GLOBAL))
        strategy.configure_fit(1, strategy.initial_parameters, kit.manager(2))
        results = kit.results(
            [(model(0.1), 1), ([a.astype(np.float64) for a in model(0.7)], 2), (model(0.3), 1)]
        )
        if streaming:
            accumulator = strategy.fit_accumulator(1)
            assert accumulator is not None
            for proxy, res in results:
                accumulator.add(proxy, res)
            parameters, _ = accumulator.finish([])
        else:
            parameters, _ = strategy.aggregate_fit(1, results, [])
        arrays = kit.arrays(parameters)
        assert [a.dtype for a in arrays] == [np.float64, np.float64]
        expected = (np.float32(0.1) * 1 + 0.7 * 2 + np.float32(0.3) * 1) / 4
        np.testing.assert_allclose(arrays[1], np.full(3, expected), rtol=1e-6)
