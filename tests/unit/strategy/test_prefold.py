"""FedAvg's prefold: a subclass that overrides ``aggregate_fit`` and calls ``super()``
(to save the model, say) has its mean folded as the results arrive, and gets the bits the
list of results gives, however the override treats the results."""

from __future__ import annotations

import importlib
import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.messages import Code, FitRes, Parameters, Status
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server.strategy import FedAvg
from stamen.server.strategy.aggregate import aggregate
from stamen.server.strategy.validate import collect_refusals
from stamen.typing import NDArrays

fedavg_module = importlib.import_module("stamen.server.strategy.fedavg")


class Proxy:
    def __init__(self, cid: str) -> None:
        self.cid = cid


class SavesTheModel(FedAvg):
    """The pattern Flower's docs teach: aggregate with super(), then keep the model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: list[NDArrays] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.saved.append(fl.common.parameters_to_ndarrays(parameters))
        return parameters, metrics


def _model(rng: np.random.Generator) -> NDArrays:
    return [
        rng.standard_normal((300, 11)).astype(np.float32),
        rng.standard_normal(5),  # float64
        rng.integers(0, 100, size=4),  # int64
    ]


def _strategy(cls: type[FedAvg], initial: NDArrays, **kwargs: Any) -> FedAvg:
    return cls(
        initial_parameters=ndarrays_to_parameters([np.zeros_like(a) for a in initial]),
        **kwargs,
    )


def _results(models: list[NDArrays], weights: list[int]) -> list[tuple[Any, FitRes]]:
    ok = Status(Code.OK, "")
    return [
        (Proxy(str(i)), FitRes(ok, ndarrays_to_parameters(m), n, {}))
        for i, (m, n) in enumerate(zip(models, weights, strict=True))
    ]


def _counting_aggregate(monkeypatch: Any) -> list[int]:
    """Count the list path's aggregations (FedAvg.aggregate_checked's ``aggregate``)."""
    calls: list[int] = []

    def counted(results: Any) -> NDArrays:
        calls.append(len(results))
        return aggregate(results)

    monkeypatch.setattr(fedavg_module, "aggregate", counted)
    return calls


def _run_round(strategy: FedAvg, results: list[tuple[Any, FitRes]]) -> tuple[Any, Any]:
    """As the server runs a collecting round: the prefold sees each result, in order,
    then aggregate_fit gets them all; the prefold is dropped afterwards."""
    assert strategy.fit_accumulator(1) is None  # aggregate_fit is overridden: collect
    prefold = strategy.fit_prefold(1)
    assert prefold is not None
    for proxy, res in results:
        prefold.add(proxy, res)
    outcome = strategy.aggregate_fit(1, list(results), [])
    del prefold
    return outcome


def _bits(arrays: NDArrays) -> list[bytes]:
    return [a.tobytes() for a in arrays]


def test_a_subclass_calling_super_gets_the_folded_mean_and_the_list_bits(
    monkeypatch: Any,
) -> None:
    rng = np.random.default_rng(0)
    models = [_model(rng) for _ in range(5)]
    weights = [3, 1, 70, 2, 1_000]
    calls = _counting_aggregate(monkeypatch)
    strategy = _strategy(SavesTheModel, models[0], fit_metrics_aggregation_fn=lambda m: {"n": 1})
    parameters, metrics = _run_round(strategy, _results(models, weights))
    assert calls == []  # the prefold's mean was the aggregate: no pass over the list
    got = parameters_to_ndarrays(parameters)
    want = aggregate(list(zip(models, weights, strict=True)))
    assert _bits(got) == _bits(want)
    assert [a.dtype for a in got] == [np.float32, np.float64, np.int64]
    assert metrics == {"n": 1}
    assert _bits(strategy.saved[0]) == _bits(want)


def test_the_prefold_is_dropped_with_the_servers_reference() -> None:
    rng = np.random.default_rng(1)
    models = [_model(rng) for _ in range(2)]
    strategy = _strategy(SavesTheModel, models[0])
    _run_round(strategy, _results(models, [1, 2]))
    assert strategy._prefold is not None and strategy._prefold() is None


class Unweighted(FedAvg):
    """Every client counts once: num_examples set to 1 before super()."""

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        ones = [(p, replace(r, num_examples=1)) for p, r in results]
        return super().aggregate_fit(server_round, ones, failures)


class Reversed(FedAvg):
    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        return super().aggregate_fit(server_round, results[::-1], failures)


class DropsTheLast(FedAvg):
    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        return super().aggregate_fit(server_round, results[:-1], failures)


class AddsToTheTensorsInPlace(FedAvg):
    """Changes each result's arrays (a server-side perturbation), in the same objects."""

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        for _, res in results:
            arrays = [a + 1 for a in parameters_to_ndarrays(res.parameters)]
            res.parameters.tensors[:] = ndarrays_to_parameters(arrays).tensors
        return super().aggregate_fit(server_round, results, failures)


class UnweightedInPlace(FedAvg):
    """Every client counts once, set on the results themselves (Flower's FitRes is
    mutable, so strategies written for it do this)."""

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        for _, res in results:
            res.num_examples = 1
        return super().aggregate_fit(server_round, results, failures)


class ClipsEachResult(FedAvg):
    """Replaces each result's parameters with a clipped model, as Flower's server-side
    clipping wrappers do (``res.parameters = ndarrays_to_parameters(...)``)."""

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        for _, res in results:
            res.parameters = ndarrays_to_parameters(
                [np.clip(a, -0.5, 0.5) for a in parameters_to_ndarrays(res.parameters)]
            )
        return super().aggregate_fit(server_round, results, failures)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Unweighted, lambda m, w: aggregate([(a, 1) for a in m])),
        (UnweightedInPlace, lambda m, w: aggregate([(a, 1) for a in m])),
        (
            ClipsEachResult,
            lambda m, w: aggregate(
                [([np.clip(a, -0.5, 0.5) for a in x], n) for x, n in zip(m, w, strict=True)]
            ),
        ),
        (Reversed, lambda m, w: aggregate(list(zip(m, w, strict=True))[::-1])),
        (DropsTheLast, lambda m, w: aggregate(list(zip(m, w, strict=True))[:-1])),
        (
            AddsToTheTensorsInPlace,
            lambda m, w: aggregate([([a + 1 for a in x], n) for x, n in zip(m, w, strict=True)]),
        ),
    ],
)
def test_a_subclass_that_changes_the_results_gets_their_aggregate(
    monkeypatch: Any, cls: type[FedAvg], expected: Any
) -> None:
    """Other results, other weights, another order: the prefold is not used, and the
    aggregate is the list's."""
    rng = np.random.default_rng(2)
    models = [_model(rng) for _ in range(4)]
    weights = [5, 1, 9, 2]
    calls = _counting_aggregate(monkeypatch)
    parameters, _ = _run_round(_strategy(cls, models[0]), _results(models, weights))
    assert len(calls) == 1
    assert _bits(parameters_to_ndarrays(parameters)) == _bits(expected(models, weights))


def test_a_refused_result_is_logged_once_when_aggregate_fit_reaches_it(
    monkeypatch: Any, caplog: Any
) -> None:
    """The prefold checks quietly; aggregate_fit reuses its verdicts, logs and files the
    refusal as it would have, and still takes the folded mean of the valid results."""
    rng = np.random.default_rng(3)
    models = [_model(rng) for _ in range(3)]
    models[1][0][4, 2] = np.nan
    calls = _counting_aggregate(monkeypatch)
    strategy = _strategy(SavesTheModel, models[0])
    assert strategy.fit_accumulator(1) is None
    prefold = strategy.fit_prefold(1)
    assert prefold is not None
    results = _results(models, [1, 2, 3])
    with caplog.at_level(logging.WARNING, logger="stamen"):
        for proxy, res in results:
            prefold.add(proxy, res)
        assert "NaN" not in caplog.text  # nothing said while the results arrive
        with collect_refusals() as refused:
            parameters, _ = strategy.aggregate_fit(1, list(results), [])
    assert caplog.text.count("NaN") == 1
    assert [r.proxy.cid for r in refused] == ["1"]
    assert calls == []
    want = aggregate([(models[0], 1), (models[2], 3)])
    assert _bits(parameters_to_ndarrays(parameters)) == _bits(want)


def test_float16_layers_and_dtype_changes_take_the_list_path(monkeypatch: Any) -> None:
    """A compact sum keeps float16 as a running mean, and sums a layer whose dtype changes
    partly in float32: the list path computes otherwise, so the prefold gives up."""
    calls = _counting_aggregate(monkeypatch)
    half = [[np.full(6, v, np.float16)] for v in (1.5, 2.25, 7.0)]
    parameters, _ = _run_round(_strategy(SavesTheModel, half[0]), _results(half, [1, 2, 3]))
    assert len(calls) == 1
    assert _bits(parameters_to_ndarrays(parameters)) == _bits(
        aggregate([(m, n) for m, n in zip(half, [1, 2, 3], strict=True)])
    )
    mixed = [[np.full(6, 0.1, np.float32)], [np.full(6, 0.2, np.float64)]]
    parameters, _ = _run_round(_strategy(SavesTheModel, mixed[0]), _results(mixed, [1, 1]))
    assert len(calls) == 2
    got = parameters_to_ndarrays(parameters)[0]
    assert got.dtype == np.float64
    assert _bits([got]) == _bits(aggregate([(mixed[0], 1), (mixed[1], 1)]))


class OwnRule(FedAvg):
    def aggregate_checked(self, server_round: int, checked: Any) -> Any:
        return super().aggregate_checked(server_round, checked)


def test_no_prefold_without_fedavgs_rule_or_a_model_layout() -> None:
    """A subclass that overrides the rule, or a round whose model layout is unknown."""
    initial = [np.zeros(3, np.float32)]
    assert _strategy(OwnRule, initial).fit_prefold(1) is None
    assert SavesTheModel().fit_prefold(1) is None  # no initial model: no layout yet
    empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
    assert SavesTheModel(initial_parameters=empty).fit_prefold(1) is None
    assert fl.server.strategy.FedMedian().fit_prefold(1) is None


def test_an_unused_fold_is_let_go_before_the_list_path_runs(monkeypatch: Any) -> None:
    """The folded sum (a model's worth of memory) is not held while the list path
    computes the aggregate of results the subclass changed."""
    rng = np.random.default_rng(4)
    models = [_model(rng) for _ in range(3)]
    strategy = _strategy(Reversed, models[0])
    held: list[bool] = []

    def watched(results: Any) -> NDArrays:
        prefold = strategy._prefold_of(1)
        held.append(prefold is not None and prefold._sum is not None)
        return aggregate(results)

    monkeypatch.setattr(fedavg_module, "aggregate", watched)
    _run_round(strategy, _results(models, [1, 2, 3]))
    assert held == [False]


def test_verdicts_are_reused_only_against_the_layout_they_were_given_for() -> None:
    """If the model's layout changed after the results were seen, aggregate_fit checks
    them again against the layout it has: here every result is refused."""
    models = [[np.full(3, 1.0, np.float32)], [np.full(3, 2.0, np.float32)]]
    strategy = _strategy(SavesTheModel, models[0])
    assert strategy.fit_accumulator(1) is None
    prefold = strategy.fit_prefold(1)
    assert prefold is not None
    results = _results(models, [1, 1])
    for proxy, res in results:
        prefold.add(proxy, res)
    strategy.observe_global_model(ndarrays_to_parameters([np.zeros(4, np.float32)]))
    with collect_refusals() as refused:
        parameters, _ = strategy.aggregate_fit(1, list(results), [])
    assert parameters is None
    assert len(refused) == 2
