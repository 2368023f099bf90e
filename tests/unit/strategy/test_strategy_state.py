"""state_dict() / load_state_dict(): a restored strategy continues exactly like the original."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stamen.client.dp import AdaptiveClippingNumPyClient
from stamen.client.numpy_client import NumPyClient
from stamen.errors import ConfigError
from stamen.messages import Parameters
from stamen.ndarrays import parameters_to_ndarrays
from stamen.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedXgbBagging,
    FedYogi,
    Krum,
    Strategy,
    StrategyState,
)
from stamen.typing import NDArrays

INITIAL = [np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), np.zeros(4, np.float32)]


class Mover(NumPyClient):
    """Client ``k`` moves the model by a fixed pseudo-random step for each round."""

    def __init__(self, k: int, server_round: int) -> None:
        self.step = np.random.default_rng(100 * server_round + k)

    def fit(self, parameters: NDArrays, config: Any) -> tuple[NDArrays, int, dict[str, Any]]:
        return [p + self.step.normal(0, 0.5, p.shape).astype(p.dtype) for p in parameters], 3, {}


def run(
    strategy: Strategy, parameters: Parameters, rounds: range, kit: Any
) -> tuple[Parameters, list[NDArrays]]:
    """Rounds as a server runs them; clients clip when the config asks for it."""
    outputs: list[NDArrays] = []
    for server_round in rounds:
        instructions = strategy.configure_fit(server_round, parameters, kit.manager(3))
        results = []
        for k, (proxy, fit_ins) in enumerate(instructions):
            client: NumPyClient = Mover(k, server_round)
            if "clipping_norm" in fit_ins.config:
                client = AdaptiveClippingNumPyClient(client)
            results.append((proxy, client.to_client().fit(fit_ins)))
        aggregated, _ = strategy.aggregate_fit(server_round, results, [])
        assert aggregated is not None
        parameters = aggregated
        outputs.append(parameters_to_ndarrays(aggregated))
    return parameters, outputs


def through_disk(state: StrategyState, directory: Path) -> StrategyState:
    """Save as a checkpoint would (.npy without pickle, JSON) and load back."""
    (directory / "values.json").write_text(json.dumps(state.values))
    names = {}
    for name, arrays in state.arrays.items():
        names[name] = len(arrays)
        for i, array in enumerate(arrays):
            np.save(directory / f"{name.replace('/', '__')}-{i}.npy", array, allow_pickle=False)
    (directory / "arrays.json").write_text(json.dumps(names))
    loaded = {
        name: [
            np.load(directory / f"{name.replace('/', '__')}-{i}.npy", allow_pickle=False)
            for i in range(count)
        ]
        for name, count in json.loads((directory / "arrays.json").read_text()).items()
    }
    return StrategyState(arrays=loaded, values=json.loads((directory / "values.json").read_text()))


STATEFUL: dict[str, Callable[[Parameters], Strategy]] = {
    "FedAvgM": lambda init: FedAvgM(
        initial_parameters=init, server_learning_rate=0.7, server_momentum=0.9
    ),
    "FedAdagrad": lambda init: FedAdagrad(initial_parameters=init),
    "FedAdam": lambda init: FedAdam(initial_parameters=init),
    "FedYogi": lambda init: FedYogi(initial_parameters=init),
    "DPServerFixed(FedAdam)": lambda init: DifferentialPrivacyServerSideFixedClipping(
        FedAdam(initial_parameters=init), 0.5, 1.0, 3, seed=1
    ),
    "DPServerAdaptive(FedAvgM)": lambda init: DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvgM(initial_parameters=init, server_momentum=0.5), 0.2, 3, seed=2
    ),
    "DPClientFixed(FedYogi)": lambda init: DifferentialPrivacyClientSideFixedClipping(
        FedYogi(initial_parameters=init), 0.1, 0.8, 3, seed=4
    ),
    "DPClientAdaptive(FedAvg)": lambda init: DifferentialPrivacyClientSideAdaptiveClipping(
        FedAvg(), 0.2, 3, initial_clipping_norm=0.5, seed=3
    ),
}


def assert_same_state(a: StrategyState, b: StrategyState) -> None:
    assert a.values == b.values
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        for x, y in zip(a.arrays[name], b.arrays[name], strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", list(STATEFUL))
def test_restored_strategy_continues_exactly(kit: Any, name: str, tmp_path: Path) -> None:
    """Two rounds, a state saved to disk (.npy without pickle and JSON), then two more rounds
    on the original and on a fresh strategy restored from the state: bit-identical models
    and states (momentum, moments, clipping norm, the seeded noise)."""
    init = kit.params(INITIAL)
    original = STATEFUL[name](init)
    parameters, _ = run(original, init, range(1, 3), kit)
    state = original.state_dict()
    assert not state.is_empty()
    restored = STATEFUL[name](init)
    restored.load_state_dict(through_disk(state, tmp_path))
    _, expected = run(original, parameters, range(3, 5), kit)
    _, got = run(restored, parameters, range(3, 5), kit)
    for want, have in zip(expected, got, strict=True):
        for x, y in zip(want, have, strict=True):
            np.testing.assert_array_equal(x, y)
    assert_same_state(original.state_dict(), restored.state_dict())


def test_state_names_what_each_strategy_keeps(kit: Any) -> None:
    """FedAdam: x_t, m_t, v_t; the DP wrappers nest their strategy's under "strategy/"; an
    adaptive wrapper keeps its clipping norm; an unseeded wrapper saves no RNG state."""
    init = kit.params(INITIAL)
    adam = FedAdam(initial_parameters=init)
    run(adam, init, range(1, 2), kit)
    assert sorted(adam.state_dict().arrays) == ["current_weights", "m_t", "v_t"]
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAdam(initial_parameters=init), 0.0, 3
    )
    run(wrapper, init, range(1, 2), kit)
    state = wrapper.state_dict()
    assert sorted(state.arrays) == ["strategy/current_weights", "strategy/m_t", "strategy/v_t"]
    assert sorted(state.values) == ["clipping_norm", "strategy/model_dtypes"]
    assert state.values["strategy/model_dtypes"] == ["<f4", "<f4"]
    assert state.values["clipping_norm"] == wrapper.clipping_norm


def test_stateless_strategies_have_an_empty_state() -> None:
    """FedAvg, FedMedian, Krum: empty state; loading entries they do not know raises."""
    for strategy in (FedAvg(), FedMedian(), Krum()):
        assert strategy.state_dict().is_empty()
        strategy.load_state_dict(StrategyState())
        with pytest.raises(ConfigError, match="unknown entries"):
            strategy.load_state_dict(StrategyState(values={"clipping_norm": 1.0}))


def test_loading_a_state_of_another_strategy_fails(kit: Any) -> None:
    """A FedAdam state does not load into FedAvgM; a state of other shapes does not load."""
    init = kit.params(INITIAL)
    adam = FedAdam(initial_parameters=init)
    run(adam, init, range(1, 2), kit)
    with pytest.raises(ConfigError, match="unknown entries"):
        FedAvgM(initial_parameters=init).load_state_dict(adam.state_dict())
    state = adam.state_dict()
    state.arrays["m_t"] = [np.zeros(1)]
    with pytest.raises(Exception, match="layers"):
        FedAdam(initial_parameters=init).load_state_dict(state)


def test_state_refuses_values_json_cannot_hold() -> None:
    """StrategyState accepts only JSON values and non-object arrays."""
    with pytest.raises(ConfigError):
        StrategyState(values={"x": float("nan")})
    with pytest.raises(ConfigError):
        StrategyState(values={"x": object()})  # type: ignore[dict-item]
    with pytest.raises(ConfigError):
        StrategyState(arrays={"x": [np.array([object()])]})


def test_xgb_forest_round_trips(kit: Any, tmp_path: Path) -> None:
    """FedXgbBagging saves its forest as a uint8 array and restores the same bytes."""
    strategy = FedXgbBagging()
    forest = json.dumps({"learner": {"gradient_booster": {"model": {}}}}).encode()
    strategy.global_model = forest
    restored = FedXgbBagging()
    restored.load_state_dict(through_disk(strategy.state_dict(), tmp_path))
    assert restored.global_model == forest
    assert FedXgbBagging().state_dict().is_empty()
