"""FedAvg and its close variants, against results worked out by hand."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from stamen.errors import ConfigError
from stamen.server.strategy import (
    Bulyan,
    FaultTolerantFedAvg,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    QFedAvg,
    weighted_average,
)
from stamen.server.strategy.aggregate import aggregate_median


def v(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_fedavg_weighted_mean_and_metrics_hooks(kit: Any) -> None:
    """FedAvg: (2 * [0, 4] + 6 * [4, 0]) / 8 = [3, 1]; the hooks get (num_examples, metrics)."""
    strategy = FedAvg(
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    results = kit.results([([v(0, 4)], 2), ([v(4, 0)], 6)], metrics=[{"acc": 0.5}, {"acc": 1.0}])
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    np.testing.assert_array_equal(kit.arrays(parameters)[0], v(3, 1))
    assert metrics == {"acc": (2 * 0.5 + 6 * 1.0) / 8}
    evaluations = [
        (kit.proxy("a"), kit.eval_res(1.0, 1, {"acc": 0.0})),
        (kit.proxy("b"), kit.eval_res(2.0, 3, {"acc": 1.0})),
    ]
    assert strategy.aggregate_evaluate(1, evaluations, []) == (1.75, {"acc": 0.75})


def test_fedavg_without_results_keeps_the_model(kit: Any) -> None:
    """No results (all failed): (None, {}) for fit and evaluate."""
    assert FedAvg().aggregate_fit(1, [], [RuntimeError("x")]) == (None, {})
    assert FedAvg().aggregate_evaluate(1, [], []) == (None, {})


def test_fedavg_samples_like_flower(kit: Any) -> None:
    """max(int(available * fraction), min_clients) clients, one shared FitIns."""
    strategy = FedAvg(fraction_fit=0.5, min_fit_clients=2, on_fit_config_fn=lambda r: {"round": r})
    instructions = strategy.configure_fit(3, kit.params([v(1)]), kit.manager(7))
    assert len(instructions) == 3
    assert len({id(ins) for _, ins in instructions}) == 1
    assert instructions[0][1].config == {"round": 3}
    assert (
        FedAvg(fraction_evaluate=0.0).configure_evaluate(1, kit.params([v(1)]), kit.manager(2))
        == []
    )


def test_fedavg_rejects_bad_arguments() -> None:
    """Fractions outside [0, 1] and negative counts raise ConfigError naming the field."""
    with pytest.raises(ConfigError, match="fraction_fit"):
        FedAvg(fraction_fit=1.5)
    with pytest.raises(ConfigError, match="min_fit_clients"):
        FedAvg(min_fit_clients=-1)


def test_fault_tolerant_fedavg_completion_rate(kit: Any, caplog: Any) -> None:
    """Aggregated when valid / (valid + failures) >= 0.5; a refused result is a failure."""
    strategy = FaultTolerantFedAvg()
    results = kit.results([([v(1)], 1), ([v(3)], 1)])
    out = strategy.aggregate_fit(1, results, [RuntimeError("a"), RuntimeError("b")])
    assert kit.arrays(out[0])[0][0] == 2.0  # 2 / 4 = 0.5
    nan = kit.results([([v(np.nan)], 1)])[0]
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        out = strategy.aggregate_fit(1, [*results, nan], [RuntimeError("a"), RuntimeError("b")])
    assert out == (None, {})  # 2 / 5 < 0.5
    assert "completion rate 0.4" in caplog.text
    evaluations = [(kit.proxy("a"), kit.eval_res(1.0, 1))]
    assert strategy.aggregate_evaluate(1, evaluations, [RuntimeError("a")]) == (1.0, {})
    assert strategy.aggregate_evaluate(1, evaluations, [RuntimeError("a")] * 2) == (None, {})


def test_fedprox_sends_proximal_mu_in_one_shared_fitins(kit: Any) -> None:
    """FedProx adds config["proximal_mu"] to FedAvg's config; all clients share one FitIns."""
    strategy = FedProx(proximal_mu=0.25, on_fit_config_fn=lambda r: {"epochs": 2})
    instructions = strategy.configure_fit(1, kit.params([v(1)]), kit.manager(3))
    assert len({id(ins) for _, ins in instructions}) == 1
    assert instructions[0][1].config == {"epochs": 2, "proximal_mu": 0.25}
    results = kit.results([([v(1)], 1), ([v(3)], 1)])
    assert kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0][0] == 2.0


def test_fedavgm_momentum_by_hand(kit: Any) -> None:
    """eta=1, beta=0.5 from w1 = [0, 0].

    Round 1: mean [1, 2]; g = w - mean = [-1, -2]; v = g; w2 = w1 - v = [1, 2].
    Round 2: mean [2, 2]; g = [-1, 0]; v = 0.5 * [-1, -2] + [-1, 0] = [-1.5, -1];
    w3 = [1, 2] + [1.5, 1] = [2.5, 3].
    """
    strategy = FedAvgM(initial_parameters=kit.params([v(0, 0)]), server_momentum=0.5)
    r1 = kit.results([([v(0, 2)], 1), ([v(2, 2)], 1)])
    np.testing.assert_array_equal(kit.arrays(strategy.aggregate_fit(1, r1, [])[0])[0], v(1, 2))
    r2 = kit.results([([v(2, 2)], 5)])
    np.testing.assert_array_equal(kit.arrays(strategy.aggregate_fit(2, r2, [])[0])[0], v(2.5, 3))
    assert strategy.momentum_vector is not None
    np.testing.assert_array_equal(strategy.momentum_vector[0], v(-1.5, -1))


def test_fedavgm_server_learning_rate_by_hand(kit: Any) -> None:
    """eta=0.5, beta=0.5: w2 = 0 - 0.5 * [-1, -2] = [0.5, 1]; round 2 (mean [2, 2]):
    g = [-1.5, -1], v = [-0.5, -1] + [-1.5, -1] = [-2, -2], w3 = [0.5, 1] + [1, 1]."""
    strategy = FedAvgM(
        initial_parameters=kit.params([v(0, 0)]), server_learning_rate=0.5, server_momentum=0.5
    )
    r1 = kit.results([([v(1, 2)], 1)])
    np.testing.assert_array_equal(kit.arrays(strategy.aggregate_fit(1, r1, [])[0])[0], v(0.5, 1))
    r2 = kit.results([([v(2, 2)], 1)])
    np.testing.assert_array_equal(kit.arrays(strategy.aggregate_fit(2, r2, [])[0])[0], v(1.5, 2))


def test_fedavgm_defaults_are_fedavg_and_first_model_comes_from_configure_fit(kit: Any) -> None:
    """Defaults (eta=1, beta=0) give FedAvg exactly; without initial_parameters the global
    model of the first configure_fit is w1 (where Flower fails an assertion)."""
    results = kit.results([([v(1, 5)], 1), ([v(3, 1)], 3)])
    np.testing.assert_array_equal(
        kit.arrays(FedAvgM().aggregate_fit(1, results, [])[0])[0], v(2.5, 2)
    )
    strategy = FedAvgM(server_learning_rate=0.5)
    strategy.configure_fit(1, kit.params([v(0, 0)]), kit.manager(2))
    np.testing.assert_array_equal(
        kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0], v(1.25, 1)
    )


def test_fedavgm_without_any_model_logs_instead_of_crashing(kit: Any, caplog: Any) -> None:
    """Server momentum with no initial model and no configure_fit: the round is not
    aggregated and the log says what is missing."""
    with caplog.at_level(logging.ERROR, logger="stamen.server"):
        out = FedAvgM(server_momentum=0.9).aggregate_fit(1, kit.results([([v(1)], 1)]), [])
    assert out == (None, {})
    assert "give initial_parameters" in caplog.text


def test_fedavgm_refused_round_leaves_momentum_untouched(kit: Any) -> None:
    """With accept_failures=False a round stopped by a bad result updates no state."""
    strategy = FedAvgM(
        initial_parameters=kit.params([v(0.0)]), server_momentum=0.5, accept_failures=False
    )
    results = kit.results([([v(1.0)], 1), ([v(np.nan)], 1)])
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    assert strategy.momentum_vector is None
    np.testing.assert_array_equal(strategy.current_weights[0], v(0.0))  # type: ignore[index]


def test_robust_strategies_apply_their_rules(kit: Any) -> None:
    """FedMedian, FedTrimmedAvg, Krum and Bulyan give the aggregate.py results."""
    results = kit.results([([v(x)], 1) for x in (0, 1, 2, 3.5, 4, 5, 100)])
    assert kit.arrays(FedMedian().aggregate_fit(1, results, [])[0])[0][0] == 3.5
    # beta 0.2, K 7: cut 1 -> mean(1, 2, 3.5, 4, 5) = 15.5 / 5
    assert kit.arrays(FedTrimmedAvg().aggregate_fit(1, results, [])[0])[0][0] == 15.5 / 5
    assert kit.arrays(Krum(num_malicious_clients=1).aggregate_fit(1, results, [])[0])[0][0] == 3.5
    assert (
        kit.arrays(Bulyan(num_malicious_clients=1).aggregate_fit(1, results, [])[0])[0][0]
        == 6.5 / 3
    )
    assert aggregate_median([([v(1)], 1)])[0][0] == 1.0


def test_bulyan_with_too_few_results_keeps_the_model(kit: Any, caplog: Any) -> None:
    """Bulyan with f=1 and 5 valid results: not aggregated, the bound is logged."""
    results = kit.results([([v(x)], 1) for x in range(5)])
    with caplog.at_level(logging.ERROR, logger="stamen.server"):
        assert Bulyan(num_malicious_clients=1).aggregate_fit(1, results, []) == (None, {})
    assert "needs at least 4 * num_malicious + 3 = 7 results, received 5" in caplog.text


def test_bulyan_refuses_rules_that_do_not_select_at_construction() -> None:
    """Bulyan(first_aggregation_rule=...) accepts only single-model Krum."""
    with pytest.raises(ConfigError):
        Bulyan(first_aggregation_rule=aggregate_median)
    with pytest.raises(ConfigError):
        Bulyan(to_keep=3)
    Bulyan(to_keep=0)


def test_trimmed_avg_refuses_beta_of_one_half() -> None:
    """beta must be in [0, 0.5)."""
    with pytest.raises(ConfigError, match="beta"):
        FedTrimmedAvg(beta=0.5)


def test_qfedavg_with_q_zero_is_the_plain_mean(kit: Any) -> None:
    """q=0, lr=0.5 (L=2) from w=[1, 1]: g1 = 2([1,1] - [3,5]) = [-4,-8], g2 = 2([0, 2]) =
    [0, 4], h = L = 2 each: w - [-4, -4] / 4 = [2, 2], the unweighted mean of the clients."""
    strategy = QFedAvg(q_param=0.0, qffl_learning_rate=0.5, evaluate_fn=lambda r, w, c: (1.0, {}))
    strategy.configure_fit(1, kit.params([v(1, 1)]), kit.manager(2))
    results = kit.results([([v(3, 5)], 10), ([v(1, -1)], 1)])
    np.testing.assert_array_equal(kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0], v(2, 2))


def test_qfedavg_by_hand(kit: Any) -> None:
    """q=1, lr=0.5 (L=2), loss 3 of w=[1, 1] from evaluate_fn; F = 3 + 1e-10:
    Delta_k = F * g_k, h_k = q * F^0 * ||g_k||^2 + L * F, w' = w - sum Delta / sum h."""
    losses: list[tuple[int, list[float]]] = []

    def evaluate_fn(server_round: int, weights: Any, config: Any) -> tuple[float, dict[str, Any]]:
        losses.append((server_round, weights[0].tolist()))
        return 3.0, {}

    strategy = QFedAvg(q_param=1.0, qffl_learning_rate=0.5, evaluate_fn=evaluate_fn)
    strategy.configure_fit(4, kit.params([v(1, 1)]), kit.manager(2))
    results = kit.results([([v(3, 5)], 1), ([v(1, -1)], 1)])
    out = kit.arrays(strategy.aggregate_fit(4, results, [])[0])[0]
    f = 3.0 + 1e-10
    g1, g2 = [-4.0, -8.0], [0.0, 4.0]
    h = (1.0 * 1.0 * (16.0 + 64.0) + 2.0 * f) + (1.0 * 1.0 * (0.0 + 16.0) + 2.0 * f)
    expected = [1.0 - (f * g1[i] + f * g2[i]) / h for i in range(2)]
    np.testing.assert_array_equal(out, expected)
    assert losses == [(4, [1.0, 1.0])]


def test_qfedavg_needs_evaluate_fn(kit: Any) -> None:
    """Without evaluate_fn QFedAvg cannot weigh updates: ConfigError in configure_fit."""
    with pytest.raises(ConfigError, match="evaluate_fn is required"):
        QFedAvg().configure_fit(1, kit.params([v(1)]), kit.manager(1))


def test_reprs_follow_flower() -> None:
    """repr() as Flower's, e.g. FedMedian(accept_failures=True)."""
    assert repr(FedMedian()) == "FedMedian(accept_failures=True)"
    assert repr(FaultTolerantFedAvg()) == "FaultTolerantFedAvg()"
