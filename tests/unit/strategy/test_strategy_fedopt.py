"""The FedOpt family: moment updates and steps against the formulas computed by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stamen.errors import ConfigError
from stamen.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi

Moment = Callable[[float, float], float]


def v(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def expected_run(
    x: list[float],
    means: list[list[float]],
    eta: float,
    beta_1: float,
    second: Moment,
    tau: float,
) -> list[list[float]]:
    """x_{t+1} per round, one coordinate at a time, in the formulas' order of operations."""
    m = [0.0] * len(x)
    w = [0.0] * len(x)
    out = []
    for mean in means:
        for i in range(len(x)):
            delta = mean[i] - x[i]
            m[i] = beta_1 * m[i] + (1 - beta_1) * delta
            w[i] = second(w[i], delta)
            x[i] = x[i] + eta * m[i] / (math.sqrt(w[i]) + tau)
        out.append(list(x))
    return out


CASES: dict[
    str, tuple[Callable[..., FedOpt], dict[str, float], Callable[[dict[str, float]], Moment]]
] = {
    # name: (class, keywords, second-moment rule given the keywords)
    "FedAdagrad": (
        FedAdagrad,
        {"eta": 0.1, "tau": 1e-9},
        lambda k: lambda w, d: w + d * d,
    ),
    "FedAdam": (
        FedAdam,
        {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9},
        lambda k: lambda w, d: k["beta_2"] * w + (1 - k["beta_2"]) * (d * d),
    ),
    "FedYogi": (
        FedYogi,
        {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        lambda k: lambda w, d: w - (1.0 - k["beta_2"]) * (d * d) * sign(w - d * d),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_three_rounds_match_the_formulas_exactly(kit: Any, name: str) -> None:
    """m_t, v_t and x_{t+1} over 3 rounds equal the paper's formulas (no bias correction),
    evaluated by hand in float64, bit for bit; the defaults are Flower's."""
    cls, keywords, rule = CASES[name]
    strategy = cls(initial_parameters=kit.params([v(0.0, 1.0, -2.0)]))
    for key, value in keywords.items():
        assert getattr(strategy, key) == value  # Flower's defaults
    means = [[1.0, 1.0, -2.5], [0.5, 2.0, -1.0], [0.25, -1.0, 3.0]]
    beta_1 = keywords.get("beta_1", 0.0)
    expected = expected_run(
        [0.0, 1.0, -2.0], means, keywords["eta"], beta_1, rule(keywords), keywords["tau"]
    )
    for server_round, (mean, want) in enumerate(zip(means, expected, strict=True), start=1):
        results = kit.results([([v(*mean)], 1)])
        out = kit.arrays(strategy.aggregate_fit(server_round, results, [])[0])[0]
        np.testing.assert_array_equal(out, v(*want))
        np.testing.assert_array_equal(strategy.current_weights[0], v(*want))


def test_fedopt_itself_is_fedavg(kit: Any) -> None:
    """FedOpt takes no step (as in Flower): its result is the FedAvg mean, state untouched."""
    strategy = FedOpt(initial_parameters=kit.params([v(0.0)]))
    results = kit.results([([v(1.0)], 1), ([v(3.0)], 3)])
    assert kit.arrays(strategy.aggregate_fit(1, results, [])[0])[0][0] == 2.5
    assert strategy.m_t is None
    assert strategy.v_t is None


def test_state_is_float64_and_the_model_keeps_its_dtype(kit: Any) -> None:
    """x_t, m_t, v_t are float64; the model sent out is cast back to float32."""
    strategy = FedAdam(initial_parameters=kit.params([np.zeros(2, np.float32)]))
    out = kit.arrays(strategy.aggregate_fit(1, kit.results([([np.ones(2, np.float32)], 1)]), [])[0])
    assert out[0].dtype == np.float32
    assert strategy.m_t is not None
    assert strategy.v_t is not None
    assert {a.dtype for a in [*strategy.current_weights, *strategy.m_t, *strategy.v_t]} == {
        np.dtype(np.float64)
    }
    np.testing.assert_array_equal(out[0], strategy.current_weights[0].astype(np.float32))


def test_initial_parameters_are_required(kit: Any) -> None:
    """As in Flower, FedOpt strategies need initial_parameters; bad numbers raise ConfigError."""
    with pytest.raises(TypeError):
        FedAdam()  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="tau"):
        FedYogi(initial_parameters=kit.params([v(0.0)]), tau=0.0)
    with pytest.raises(ConfigError, match="beta_1"):
        FedAdam(initial_parameters=kit.params([v(0.0)]), beta_1=1.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: FedAdagrad(initial_parameters=p, eta=0.1, tau=1e-9),
        lambda p: FedAdam(initial_parameters=p, eta=0.1, tau=1e-9),
        lambda p: FedYogi(initial_parameters=p, eta=0.1, tau=1e-9),
        lambda p: FedAvgM(initial_parameters=p, server_learning_rate=0.5, server_momentum=0.9),
    ],
    ids=["FedAdagrad", "FedAdam", "FedYogi", "FedAvgM"],
)
def test_a_0d_layer_stays_an_array_through_the_server_step(kit: Any, make: Any) -> None:
    """A scalar layer (a 0-d array, e.g. a step counter) goes through the server's step
    and its state as a 0-d array of its dtype, round after round, and the state saves."""
    model = [np.array(0.0, dtype=np.float32), np.zeros(2, dtype=np.float32)]
    strategy = make(kit.params(model))
    for server_round in (1, 2):
        results = kit.results([([np.array(1.0, np.float32), np.ones(2, np.float32)], 1)])
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        out = kit.arrays(parameters)
        assert out[0].shape == () and out[0].dtype == np.float32, out[0]
        assert out[1].shape == (2,)
        assert np.isfinite(out[0]) and float(out[0]) == float(out[1][0])
        strategy.configure_fit(server_round + 1, parameters, kit.manager(2))
    state = strategy.state_dict()
    assert all(isinstance(a, np.ndarray) for a in state.arrays["current_weights"])
    restored = make(kit.params(model))
    restored.load_state_dict(state)
    assert restored.state_dict().arrays.keys() == state.arrays.keys()
