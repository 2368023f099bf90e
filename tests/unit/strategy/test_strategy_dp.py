"""Differential privacy: clipping math, the four server wrappers and the client wrappers."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from stamen.client.dp import AdaptiveClippingNumPyClient, FixedClippingNumPyClient
from stamen.client.numpy_client import NumPyClient
from stamen.context import Context, RecordSet
from stamen.errors import ConfigError
from stamen.messages import Code, EvaluateIns, FitIns, GetParametersIns
from stamen.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from stamen.server.strategy.differential_privacy import (
    adaptive_clipping_norm,
    clip_update,
    compute_adaptive_noise_params,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
)
from stamen.typing import NDArrays


def v(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


# --- the math --------------------------------------------------------------------------------


def test_flat_clip_scales_the_whole_update() -> None:
    """||[3, 4], [0]|| = 5: clipped to 2.5 it is [1.5, 2]; a norm of 5 or a zero update is
    left alone and not counted as clipped."""
    assert get_norm([v(3), v(4)]) == 5.0
    clipped, bit = clip_update([v(3, 4), v(0)], 2.5)
    np.testing.assert_array_equal(clipped[0], v(1.5, 2))
    assert bit is True
    same, bit = clip_update([v(3, 4)], 5.0)
    np.testing.assert_array_equal(same[0], v(3, 4))
    assert bit is False
    zero, bit = clip_update([v(0, 0)], 1.0)
    np.testing.assert_array_equal(zero[0], v(0, 0))
    assert bit is False


def test_clip_model_update_keeps_dtype() -> None:
    """[4, 5] around [1, 1] (update [3, 4], norm 5) clipped to 2.5 is [2.5, 3.0] in float32."""
    model = [np.array([4, 5], np.float32)]
    reference = [np.array([1, 1], np.float32)]
    clipped, bit = compute_clip_model_update(model, reference, 2.5)
    assert clipped[0].dtype == np.float32
    np.testing.assert_array_equal(clipped[0], np.array([2.5, 3.0], np.float32))
    assert bit


def test_noise_parameters() -> None:
    """std = sigma * C / m; adaptive clipping raises sigma to pay for the count noise."""
    assert compute_stdv(1.0, 2.0, 4) == 0.5
    assert compute_adaptive_noise_params(0.0, 10, None) == (0.0, 0.0)
    assert compute_adaptive_noise_params(0.0, 10, 3.0) == (3.0, 0.0)
    stddev, sigma = compute_adaptive_noise_params(1.0, 100, None)
    assert stddev == 5.0
    assert sigma == (1.0**-2 - 10.0**-2) ** -0.5
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        compute_adaptive_noise_params(1.0, 10, None)  # default 0.5: sigma >= 2 * 0.5


def test_clipping_norm_update_rules() -> None:
    """Flower's rule lowers C when more than the target are clipped; the paper's raises it."""
    assert adaptive_clipping_norm(0.1, 1.0, 0.5, 0.2, flower_compatible_update=True) == (
        0.1 * math.exp(-0.2 * 0.5)
    )
    assert adaptive_clipping_norm(0.1, 1.0, 0.5, 0.2, flower_compatible_update=False) == (
        0.1 * math.exp(0.2 * 0.5)
    )
    assert adaptive_clipping_norm(0.1, 0.5, 0.5, 0.2, flower_compatible_update=True) == 0.1


# --- server-side wrappers ----------------------------------------------------------------------


def test_server_side_fixed_clipping_by_hand(kit: Any) -> None:
    """Global [0, 0]; clients [3, 4] and [0, 1] clipped to 2.5 -> [1.5, 2] and [0, 1];
    FedAvg -> [0.75, 1.5]; no noise with noise_multiplier 0."""
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.0, 2.5, 2)
    strategy.configure_fit(1, kit.params([v(0, 0)]), kit.manager(2))
    results = kit.results([([v(3, 4)], 1), ([v(0, 1)], 1)])
    np.testing.assert_array_equal(
        kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0], v(0.75, 1.5)
    )


@pytest.mark.parametrize("flower_rule", [True, False])
def test_server_side_adaptive_clipping_two_rounds(kit: Any, flower_rule: bool) -> None:
    """C=2.5, target 0.5, lr 0.2. Round 1 from [0, 0]: [3, 4] is clipped to [1.5, 2],
    [0, 0.5] is not; half clipped, so C stays 2.5; mean [0.75, 1.25]. Round 2: updates
    [3, 4] and [0, 5] are both clipped, to [1.5, 2] and [0, 2.5]: mean [1.5, 3.5]; all
    clipped, so C = 2.5 * exp(-0.2 * 0.5) (Flower's rule) or exp(+0.2 * 0.5) (the paper's)."""
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), 0.0, 2, initial_clipping_norm=2.5, flower_compatible_update=flower_rule
    )
    strategy.configure_fit(1, kit.params([v(0, 0)]), kit.manager(2))
    r1 = kit.results([([v(3, 4)], 1), ([v(0, 0.5)], 1)])
    out = kit.arrays(strategy.aggregate_fit(1, r1, [])[0])[0]
    np.testing.assert_array_equal(out, v(0.75, 1.25))
    assert strategy.clipping_norm == 2.5
    strategy.configure_fit(2, kit.params([out]), kit.manager(2))
    r2 = kit.results([([out + v(3, 4)], 1), ([out + v(0, 5)], 1)])
    np.testing.assert_array_equal(kit.arrays(strategy.aggregate_fit(2, r2, [])[0])[0], v(1.5, 3.5))
    assert strategy.clipping_norm == 2.5 * math.exp((-0.2 if flower_rule else 0.2) * (1.0 - 0.5))


def test_noise_has_the_configured_std_and_follows_the_seed(kit: Any) -> None:
    """sigma=1, C=2, m=1: noise std 2 on each parameter; the same seed gives the same noise."""

    def noised(seed: int) -> np.ndarray:
        strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 2.0, 1, seed=seed)
        strategy.configure_fit(1, kit.params([np.zeros(100_000)]), kit.manager(2))
        results = kit.results([([np.zeros(100_000)], 1)])
        return kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0]

    first = noised(7)
    assert abs(float(np.std(first)) - 2.0) < 0.02
    assert abs(float(np.mean(first))) < 0.02
    np.testing.assert_array_equal(first, noised(7))
    assert not np.array_equal(first, noised(8))


def test_adaptive_noise_is_calibrated_to_the_norm_used_for_clipping(kit: Any) -> None:
    """The noise std is sigma' * C_t / m with C_t the norm this round clipped to, not the
    lowered C_{t+1} (Flower uses C_{t+1} and under-noises)."""
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), 1e-3, 1, initial_clipping_norm=1.0, clip_norm_lr=2.0,
        clipped_count_stddev=1e-3, seed=3,
    )  # fmt: skip
    sigma = (1e-3**-2 - (2e-3) ** -2) ** -0.5
    assert strategy.noise_multiplier == sigma
    zeros = np.zeros(100_000)
    strategy.configure_fit(1, kit.params([zeros]), kit.manager(2))
    model = np.full(100_000, 1.0)
    out = kit.arrays(strategy.aggregate_fit(1, kit.results([([model], 1)]), [])[0])[0]
    clipped, _ = compute_clip_model_update([model], [zeros], 1.0)
    noise = out - clipped[0]
    assert strategy.clipping_norm < 0.4  # C_{t+1} ~ exp(-1)
    assert abs(float(np.std(noise)) / (sigma * 1.0) - 1) < 0.02


def test_dp_rounds_with_failures_are_refused(kit: Any, caplog: Any) -> None:
    """Any failure — or a refused result — stops a DP round; fewer results than
    num_sampled_clients is logged."""
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.0, 1.0, 3)
    strategy.configure_fit(1, kit.params([v(0, 0)]), kit.manager(3))
    results = kit.results([([v(1, 0)], 1), ([v(0, 1)], 1)])
    assert strategy.aggregate_fit(1, results, [RuntimeError("gone")]) == (None, {})
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        assert strategy.aggregate_fit(1, results, [])[0] is not None
    assert "2 results but num_sampled_clients=3" in caplog.text
    bad = kit.results([([v(1, 0)], 1), ([v(np.nan, 0)], 1), ([v(0, 1)], 1)])
    assert strategy.aggregate_fit(1, bad, []) == (None, {})


def test_client_side_fixed_sends_the_norm_and_enforces_it(kit: Any, caplog: Any) -> None:
    """configure_fit adds "clipping_norm" to the one shared FitIns; an update over the norm
    (a client that did not clip) is clipped by the server, with a warning."""
    strategy = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(on_fit_config_fn=lambda r: {"lr": 0.1}), 0.0, 2.5, 2
    )
    instructions = strategy.configure_fit(1, kit.params([v(0, 0)]), kit.manager(2))
    assert len({id(ins) for _, ins in instructions}) == 1
    assert instructions[0][1].config == {"lr": 0.1, "clipping_norm": 2.5}
    results = kit.results([([v(1.5, 2)], 1), ([v(3, 4)], 1)])
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        out = kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0]
    np.testing.assert_array_equal(out, v(1.5, 2))
    assert "update of client c1 exceeds the clipping norm" in caplog.text


def test_client_side_adaptive_counts_norm_bits(kit: Any, caplog: Any) -> None:
    """The norm adapts to the clients' "norm_bit"s (a re-clipped update counts as clipped);
    a result without the bit stops the round."""
    strategy = DifferentialPrivacyClientSideAdaptiveClipping(
        FedAvg(), 0.0, 2, initial_clipping_norm=1.0
    )
    instructions = strategy.configure_fit(1, kit.params([v(0, 0)]), kit.manager(2))
    assert instructions[0][1].config == {"clipping_norm": 1.0}
    half = kit.results(
        [([v(0.6, 0.8)], 1), ([v(0, 0.5)], 1)], [{"norm_bit": True}, {"norm_bit": False}]
    )
    np.testing.assert_array_equal(
        kit.arrays(strategy.aggregate_fit(1, half, [])[0])[0], v(0.3, 0.65)
    )
    assert strategy.clipping_norm == 1.0
    strategy.configure_fit(2, kit.params([v(0, 0)]), kit.manager(2))
    lying = kit.results(
        [([v(0.6, 0.8)], 1), ([v(0, 3)], 1)], [{"norm_bit": True}, {"norm_bit": False}]
    )
    strategy.aggregate_fit(2, lying, [])
    assert strategy.clipping_norm == math.exp(-0.2 * 0.5)
    missing = kit.results([([v(0, 0)], 1), ([v(0, 0)], 1)], [{"norm_bit": True}, {}])
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        assert strategy.aggregate_fit(3, missing, []) == (None, {})
    assert "have no 'norm_bit' metric" in caplog.text


def test_wrapper_arguments_are_checked() -> None:
    """Negative noise, a non-positive norm or client count, or a non-strategy: ConfigError."""
    with pytest.raises(ConfigError, match="noise_multiplier"):
        DifferentialPrivacyServerSideFixedClipping(FedAvg(), -1.0, 1.0, 2)
    with pytest.raises(ConfigError, match="clipping_norm"):
        DifferentialPrivacyClientSideFixedClipping(FedAvg(), 1.0, 0.0, 2)
    with pytest.raises(ConfigError, match="num_sampled_clients"):
        DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 0)
    with pytest.raises(ConfigError, match="strategy"):
        DifferentialPrivacyClientSideAdaptiveClipping(None, 0.0, 2)  # type: ignore[arg-type]


def test_wrappers_delegate_evaluation(kit: Any) -> None:
    """Evaluation goes to the wrapped strategy unchanged."""
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.0, 1.0, 2)
    results = [(kit.proxy("a"), kit.eval_res(1.0, 1)), (kit.proxy("b"), kit.eval_res(3.0, 1))]
    assert strategy.aggregate_evaluate(1, results, []) == (2.0, {})
    assert len(strategy.configure_evaluate(1, kit.params([v(0)]), kit.manager(2))) == 2


# --- client-side wrappers ----------------------------------------------------------------------


class Trainer(NumPyClient):
    """Adds ``step`` to the parameters, in place (as training loops often do)."""

    def __init__(self, step: NDArrays) -> None:
        self.step = step

    def get_parameters(self, config: Any) -> NDArrays:
        return [np.zeros(2, np.float32)]

    def fit(self, parameters: NDArrays, config: Any) -> tuple[NDArrays, int, dict[str, Any]]:
        for p, s in zip(parameters, self.step, strict=True):
            p += s
        return parameters, 7, {"loss": 0.5}


def test_fixed_clipping_client_clips_its_update() -> None:
    """From [1, 1] a step of [3, 4] clipped to 2.5 sends [2.5, 3]; metrics unchanged."""
    client = FixedClippingNumPyClient(Trainer([np.array([3, 4], np.float32)]))
    params, n, metrics = client.fit([np.array([1, 1], np.float32)], {"clipping_norm": 2.5})
    np.testing.assert_array_equal(params[0], np.array([2.5, 3.0], np.float32))
    assert (n, metrics) == (7, {"loss": 0.5})


def test_adaptive_clipping_client_reports_the_bit() -> None:
    """AdaptiveClippingNumPyClient adds metrics["norm_bit"]: clipped or not."""
    client = AdaptiveClippingNumPyClient(Trainer([np.array([3, 4], np.float32)]))
    _, _, metrics = client.fit([np.zeros(2, np.float32)], {"clipping_norm": 1.0})
    assert metrics == {"loss": 0.5, "norm_bit": True}
    _, _, metrics = client.fit([np.zeros(2, np.float32)], {"clipping_norm": 10.0})
    assert metrics == {"loss": 0.5, "norm_bit": False}


def test_clipping_client_needs_a_valid_norm() -> None:
    """No "clipping_norm" in the config, or not a positive number: ConfigError."""
    client = FixedClippingNumPyClient(Trainer([np.ones(2, np.float32)]))
    with pytest.raises(ConfigError, match="clipping_norm"):
        client.fit([np.zeros(2, np.float32)], {})
    with pytest.raises(ConfigError, match="clipping_norm"):
        client.fit([np.zeros(2, np.float32)], {"clipping_norm": True})

    class Reshaper(Trainer):
        def fit(self, parameters: NDArrays, config: Any) -> tuple[NDArrays, int, dict[str, Any]]:
            return [np.zeros(3, np.float32)], 1, {}

    with pytest.raises(ConfigError, match="layers"):
        FixedClippingNumPyClient(Reshaper([])).fit(
            [np.zeros(2, np.float32)], {"clipping_norm": 1.0}
        )


def test_clipping_client_as_client_keeps_unimplemented_methods(kit: Any) -> None:
    """to_client(): fit is clipped and encoded; evaluate, which the wrapped client lacks,
    answers EVALUATE_NOT_IMPLEMENTED; get_parameters and the context go through."""
    client = AdaptiveClippingNumPyClient(Trainer([np.array([3, 4], np.float32)])).to_client()
    context = Context(node_id=5, node_config={}, state=RecordSet(), run_config={})
    client.set_context(context)
    res = client.fit(FitIns(kit.params([np.zeros(2, np.float32)]), {"clipping_norm": 1.0}))
    assert res.status.code == Code.OK
    np.testing.assert_allclose(kit.arrays(res.parameters)[0], [0.6, 0.8], rtol=1e-6)
    assert res.metrics["norm_bit"] is True
    evaluated = client.evaluate(EvaluateIns(kit.params([np.zeros(2)]), {}))
    assert evaluated.status.code == Code.EVALUATE_NOT_IMPLEMENTED
    got = client.get_parameters(GetParametersIns({}))
    assert kit.arrays(got.parameters)[0].shape == (2,)
    inner = client.numpy_client.client  # type: ignore[attr-defined]
    assert inner.get_context() is context

    class NoFit(NumPyClient):
        pass

    no_fit = FixedClippingNumPyClient(NoFit()).to_client()
    res = no_fit.fit(FitIns(kit.params([np.zeros(2)]), {"clipping_norm": 1.0}))
    assert res.status.code == Code.FIT_NOT_IMPLEMENTED
