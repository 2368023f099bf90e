"""The pure NumPy aggregation rules, against results worked out by hand."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from stamen.errors import ConfigError, RunError
from stamen.server.strategy import weighted_average
from stamen.server.strategy.aggregate import (
    WeightedSum,
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_qffl,
    aggregate_trimmed_avg,
    krum_scores,
    pairwise_squared_distances,
    weighted_loss_avg,
)
from stamen.typing import NDArrays


def v(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def models(*values: float) -> list[tuple[NDArrays, int]]:
    """One 1-parameter model per value, each with 1 example."""
    return [([v(x)], 1) for x in values]


def test_aggregate_weights_by_examples() -> None:
    """FedAvg: (1 * [1, 2] + 3 * [3, 6]) / 4 = [2.5, 5], and a second layer alike."""
    out = aggregate([([v(1, 2), v(10)], 1), ([v(3, 6), v(2)], 3)])
    np.testing.assert_array_equal(out[0], v(2.5, 5.0))
    np.testing.assert_array_equal(out[1], v(4.0))


def test_aggregate_keeps_every_layer_dtype() -> None:
    """float32 stays float32; int and bool layers are rounded to the nearest value."""
    first = [np.array([1.0, 2.0], np.float32), np.array([1, 2], np.int64), np.array([True, False])]
    second = [np.array([2.0, 4.0], np.float32), np.array([2, 3], np.int64), np.array([True, True])]
    out = aggregate([(first, 1), (second, 3)])
    assert [a.dtype for a in out] == [np.float32, np.int64, np.bool_]
    np.testing.assert_array_equal(out[0], np.array([1.75, 3.5], np.float32))
    # (1 + 3 * 2) / 4 = 1.75 -> 2; (2 + 3 * 3) / 4 = 2.75 -> 3
    np.testing.assert_array_equal(out[1], np.array([2, 3]))
    # (1 + 3) / 4 = 1 -> True; (0 + 3) / 4 = 0.75 -> True
    np.testing.assert_array_equal(out[2], np.array([True, True]))


def test_aggregate_accumulates_in_float64() -> None:
    """A float32 mean of many values is exact to float64 before the one final cast."""
    big = np.array([1e8], np.float32)
    small = np.array([1.0], np.float32)
    out = aggregate([([big], 1)] + [([small], 1)] * 1000)
    assert out[0][0] == np.float32((1e8 + 1000) / 1001)


def test_a_model_given_several_times_counts_with_each_weight() -> None:
    """The same model (one list, as SecAgg+ gives its survivors) is read once with its
    weights summed: the mean is what the repeated terms give."""
    shared, other = [v(1.0, 2.0), v(4.0)], [v(3.0, 0.0), v(8.0)]
    out = aggregate([(shared, 3), (other, 2), (shared, 5)])
    np.testing.assert_allclose(out[0], v(1.4, 1.6), rtol=1e-15)  # (8 x 1 + 2 x 3) / 10
    np.testing.assert_allclose(out[1], v(4.8), rtol=1e-15)
    assert aggregate([(shared, 1), (shared, 7)])[0].tolist() == [1.0, 2.0]


def test_aggregate_streams_one_model_at_a_time() -> None:
    """aggregate() consumes a generator and keeps no model it has added: when model k is
    produced, model k - 2 is gone (k - 1 is still the caller's loop variable)."""
    released: list[bool] = []
    refs: list[weakref.ref[np.ndarray]] = []

    def results() -> Iterator[tuple[NDArrays, int]]:
        for k in range(6):
            if k >= 2:
                released.append(refs[k - 2]() is None)
            model = np.full(3, float(k))
            refs.append(weakref.ref(model))
            yield [model], 1
            del model

    np.testing.assert_array_equal(aggregate(results())[0], np.full(3, 2.5))
    assert released == [True] * 4


def test_aggregate_refuses_zero_examples_and_mixed_layouts() -> None:
    """A total of 0 examples, no result, or layers of different shapes raise RunError."""
    with pytest.raises(RunError, match="0 examples in total"):
        aggregate([([v(1)], 0), ([v(2)], 0)])
    with pytest.raises(RunError, match="at least one result"):
        aggregate([])
    with pytest.raises(RunError, match="layers"):
        aggregate([([v(1)], 1), ([v(1, 2)], 1)])


def test_weighted_sum_sum_and_mean() -> None:
    """WeightedSum gives the raw sum and the mean of what was added."""
    acc = WeightedSum()
    acc.add([v(1, 2)], 2)
    acc.add([v(4, 0)], 1)
    np.testing.assert_array_equal(acc.sum()[0], v(6, 4))
    np.testing.assert_array_equal(acc.mean()[0], v(2, 4 / 3))
    assert acc.count == 2
    assert acc.total_weight == 3


def test_weighted_loss_avg() -> None:
    """(1 * 0.5 + 3 * 1.5) / 4 = 1.25; a total of 0 examples raises RunError."""
    assert weighted_loss_avg([(1, 0.5), (3, 1.5)]) == 1.25
    with pytest.raises(RunError):
        weighted_loss_avg([(0, 1.0)])


def test_median_odd_and_even() -> None:
    """Median of 1, 5, 3 is 3; of 1, 2, 3, 10 it is (2 + 3) / 2; examples are ignored."""
    assert aggregate_median(models(1, 5, 3))[0][0] == 3.0
    assert aggregate_median([([v(1)], 100), ([v(2)], 1), ([v(3)], 1), ([v(10)], 1)])[0][0] == 2.5


def test_median_is_coordinate_wise() -> None:
    """Each coordinate takes its own median."""
    out = aggregate_median([([v(1, 30)], 1), ([v(2, 10)], 1), ([v(3, 20)], 1)])
    np.testing.assert_array_equal(out[0], v(2, 20))


def test_trimmed_mean_cuts_int_beta_k_from_each_side() -> None:
    """K=5, beta=0.2: cut int(1.0) = 1 each side -> mean(2, 3, 4) = 3; beta=0.1 cuts none."""
    results = models(100, 2, 4, 1, 3)
    assert aggregate_trimmed_avg(results, 0.2)[0][0] == 3.0
    assert aggregate_trimmed_avg(results, 0.1)[0][0] == 22.0
    # K=4, beta=0.25: cut 1 -> mean(2, 3) = 2.5
    assert aggregate_trimmed_avg(models(1, 2, 3, 100), 0.25)[0][0] == 2.5


def test_trimmed_mean_refuses_a_proportion_of_one_half_or_more() -> None:
    """beta must be in [0, 0.5): 0.5 would trim everything away for an even K."""
    with pytest.raises(ConfigError, match="proportiontocut"):
        aggregate_trimmed_avg(models(1, 2), 0.5)


def test_pairwise_squared_distances_over_all_layers() -> None:
    """||w_i - w_j||^2 sums the squared differences of every layer."""
    d = pairwise_squared_distances([[v(0, 0), v(1)], [v(3, 4), v(1)], [v(0, 0), v(3)]])
    np.testing.assert_array_equal(d, np.array([[0, 25, 4], [25, 0, 29], [4, 29, 0]], float))


def test_krum_scores_and_selection() -> None:
    """Values 0, 1, 2, 10 with f=0: each score sums the 2 smallest distances to others.

    0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 10: 64 + 81 = 145 -> Krum picks 1.
    """
    results = models(0, 1, 2, 10)
    scores = krum_scores(pairwise_squared_distances([m for m, _ in results]), 0)
    np.testing.assert_array_equal(scores, v(5, 2, 5, 145))
    assert aggregate_krum(results, num_malicious=0)[0][0] == 1.0


def test_krum_with_malicious_clients_counts_fewer_neighbours() -> None:
    """f=1, K=4: only the closest neighbour counts (0: 1, 1: 1, 2: 1, 10: 64): the first wins."""
    assert aggregate_krum(models(0, 1, 2, 10), num_malicious=1)[0][0] == 0.0


def test_multi_krum_averages_the_best_by_examples() -> None:
    """to_keep=2 keeps scores 2 (value 1) and 5 (value 0, first of the tie with 2).

    Weighted by examples: (0 * 1 + 1 * 3) / 4 = 0.75.
    """
    results = [([v(0)], 1), ([v(1)], 3), ([v(2)], 1), ([v(10)], 1)]
    assert aggregate_krum(results, num_malicious=0, to_keep=2)[0][0] == 0.75
    # More to keep than results: all are kept, (0 + 3 + 2 + 10) / 6.
    assert aggregate_krum(results, num_malicious=0, to_keep=9)[0][0] == 15 / 6


def test_bulyan_by_hand() -> None:
    """K=7, f=1: theta=5 Krum picks, then the mean of the beta=3 values nearest the median.

    Values 0, 1, 2, 3.5, 4, 5, 100. Krum (4 neighbours) scores 3.5 lowest (11), then
    among 0, 1, 2, 4, 5, 100 (3 neighbours) 2 (9), then among 0, 1, 4, 5, 100 (2) 1 and 4
    tie at 10 (1 first), then 4 (1 neighbour: 1), then 0 (25, tied with 5; first).
    Selected: 3.5, 2, 1, 4, 0; median 2; nearest 3: 2, 1, 3.5 -> 6.5 / 3.
    """
    out = aggregate_bulyan(models(0, 1, 2, 3.5, 4, 5, 100), num_malicious=1)
    assert out[0][0] == 6.5 / 3


def test_bulyan_needs_4f_plus_3_results() -> None:
    """With f=1, 6 results are too few: RunError names the bound."""
    with pytest.raises(RunError, match="4 \\* num_malicious \\+ 3 = 7"):
        aggregate_bulyan(models(0, 1, 2, 3, 4, 5), num_malicious=1)


def test_bulyan_accepts_only_single_model_krum() -> None:
    """Multi-Krum or another rule cannot select models: ConfigError."""
    with pytest.raises(ConfigError, match="to_keep=0"):
        aggregate_bulyan(models(0, 1, 2), 0, aggregate_krum, to_keep=2)
    with pytest.raises(ConfigError, match="aggregate_krum"):
        aggregate_bulyan(models(0, 1, 2), 0, aggregate_median)


def test_qffl_step() -> None:
    """w - sum(Delta) / sum(h) = [1, 2] - [2, 0] / 4 = [0.5, 2]."""
    out = aggregate_qffl([v(1, 2)], [[v(0.5, 0.5)], [v(1.5, -0.5)]], [2.0, 2.0])
    np.testing.assert_array_equal(out[0], v(0.5, 2.0))


def test_weighted_average_of_metrics() -> None:
    """Numbers are averaged by examples over the clients that report them; others dropped."""
    out = weighted_average(
        [
            (10, {"accuracy": 0.5, "loss": 2, "name": "a", "flag": True}),
            (30, {"accuracy": 0.9}),
            (0, {"only_empty": 1.0}),
        ]
    )
    assert out == {"accuracy": (10 * 0.5 + 30 * 0.9) / 40, "loss": 2.0}
