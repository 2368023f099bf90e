"""Every strategy has Flower 1.12's name, keywords (in order), kinds and defaults."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import stamen.server.strategy as strategies
from stamen.server.strategy.aggregate import aggregate_krum

REQUIRED = inspect.Parameter.empty

_COMMON_HEAD = [
    ("fraction_fit", 1.0),
    ("fraction_evaluate", 1.0),
    ("min_fit_clients", 2),
    ("min_evaluate_clients", 2),
    ("min_available_clients", 2),
]
_HOOKS = [("evaluate_fn", None), ("on_fit_config_fn", None), ("on_evaluate_config_fn", None)]
_TAIL = [
    ("accept_failures", True),
    ("initial_parameters", None),
    ("fit_metrics_aggregation_fn", None),
    ("evaluate_metrics_aggregation_fn", None),
]
_FEDOPT_TAIL = [
    ("accept_failures", True),
    ("initial_parameters", REQUIRED),
    ("fit_metrics_aggregation_fn", None),
    ("evaluate_metrics_aggregation_fn", None),
]
_ONE = [(name, 1 if name.startswith("min_") else value) for name, value in _COMMON_HEAD]

# Read off Flower 1.12.0 with inspect.signature: (keyword, default) in order.
FLOWER_KEYWORDS: dict[str, list[tuple[str, Any]]] = {
    "FedAvg": [*_COMMON_HEAD, *_HOOKS, *_TAIL, ("inplace", True)],
    "FaultTolerantFedAvg": [
        *_ONE,
        *_HOOKS,
        ("min_completion_rate_fit", 0.5),
        ("min_completion_rate_evaluate", 0.5),
        ("initial_parameters", None),
        ("fit_metrics_aggregation_fn", None),
        ("evaluate_metrics_aggregation_fn", None),
    ],
    "FedAvgM": [
        *_COMMON_HEAD,
        *_HOOKS,
        *_TAIL,
        ("server_learning_rate", 1.0),
        ("server_momentum", 0.0),
    ],
    "FedProx": [*_COMMON_HEAD, *_HOOKS, *_TAIL, ("proximal_mu", REQUIRED)],
    "FedMedian": [*_COMMON_HEAD, *_HOOKS, *_TAIL, ("inplace", True)],
    "FedTrimmedAvg": [*_COMMON_HEAD, *_HOOKS, *_TAIL, ("beta", 0.2)],
    "Krum": [
        *_COMMON_HEAD,
        ("num_malicious_clients", 0),
        ("num_clients_to_keep", 0),
        *_HOOKS,
        *_TAIL,
    ],
    "Bulyan": [
        *_COMMON_HEAD,
        ("num_malicious_clients", 0),
        *_HOOKS,
        *_TAIL,
        ("first_aggregation_rule", aggregate_krum),
        ("aggregation_rule_kwargs", REQUIRED),
    ],
    "QFedAvg": [("q_param", 0.2), ("qffl_learning_rate", 0.1), *_ONE, *_HOOKS, *_TAIL],
    "FedOpt": [
        *_COMMON_HEAD,
        *_HOOKS,
        *_FEDOPT_TAIL,
        ("eta", 0.1),
        ("eta_l", 0.1),
        ("beta_1", 0.0),
        ("beta_2", 0.0),
        ("tau", 1e-9),
    ],
    "FedAdagrad": [
        *_COMMON_HEAD,
        *_HOOKS,
        ("fit_metrics_aggregation_fn", None),
        ("evaluate_metrics_aggregation_fn", None),
        ("accept_failures", True),
        ("initial_parameters", REQUIRED),
        ("eta", 0.1),
        ("eta_l", 0.1),
        ("tau", 1e-9),
    ],
    "FedAdam": [
        *_COMMON_HEAD,
        *_HOOKS,
        *_FEDOPT_TAIL,
        ("eta", 0.1),
        ("eta_l", 0.1),
        ("beta_1", 0.9),
        ("beta_2", 0.99),
        ("tau", 1e-9),
    ],
    "FedYogi": [
        *_COMMON_HEAD,
        *_HOOKS,
        *_FEDOPT_TAIL,
        ("eta", 0.01),
        ("eta_l", 0.0316),
        ("beta_1", 0.9),
        ("beta_2", 0.99),
        ("tau", 1e-3),
    ],
    "DifferentialPrivacyServerSideFixedClipping": [
        ("strategy", REQUIRED),
        ("noise_multiplier", REQUIRED),
        ("clipping_norm", REQUIRED),
        ("num_sampled_clients", REQUIRED),
    ],
    "DifferentialPrivacyClientSideFixedClipping": [
        ("strategy", REQUIRED),
        ("noise_multiplier", REQUIRED),
        ("clipping_norm", REQUIRED),
        ("num_sampled_clients", REQUIRED),
    ],
    "DifferentialPrivacyServerSideAdaptiveClipping": [
        ("strategy", REQUIRED),
        ("noise_multiplier", REQUIRED),
        ("num_sampled_clients", REQUIRED),
        ("initial_clipping_norm", 0.1),
        ("target_clipped_quantile", 0.5),
        ("clip_norm_lr", 0.2),
        ("clipped_count_stddev", None),
    ],
    "DifferentialPrivacyClientSideAdaptiveClipping": [
        ("strategy", REQUIRED),
        ("noise_multiplier", REQUIRED),
        ("num_sampled_clients", REQUIRED),
        ("initial_clipping_norm", 0.1),
        ("target_clipped_quantile", 0.5),
        ("clip_norm_lr", 0.2),
        ("clipped_count_stddev", None),
    ],
    "FedXgbBagging": [("evaluate_function", None), ("kwargs", REQUIRED)],
}


@pytest.mark.parametrize("name", list(FLOWER_KEYWORDS))
def test_flower_keywords_defaults_and_kinds(name: str) -> None:
    """Flower's parameters come first, in Flower's order, kind and default; anything
    Stamen adds (e.g. the DP wrappers' ``seed``) is keyword-only with a default."""
    parameters = list(inspect.signature(getattr(strategies, name)).parameters.values())
    flower = FLOWER_KEYWORDS[name]
    assert [(p.name, p.default) for p in parameters[: len(flower)]] == flower
    positional = name.startswith("Differential") or name == "FedXgbBagging"
    for parameter in parameters[: len(flower)]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        expected = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if positional
            else inspect.Parameter.KEYWORD_ONLY
        )
        assert parameter.kind is expected, parameter.name
    for extra in parameters[len(flower) :]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY
        assert extra.default is not REQUIRED


def test_every_issue_strategy_is_exported() -> None:
    """The package exports every strategy of the list, the state type and the helpers."""
    for name in [*FLOWER_KEYWORDS, "Strategy", "StrategyState", "weighted_average"]:
        assert name in strategies.__all__


def test_defaults_are_readable_as_attributes() -> None:
    """Flower's attribute names hold the defaults (e.g. FedYogi.eta, QFedAvg.q_param)."""
    qffl = strategies.QFedAvg()
    assert (qffl.q_param, qffl.learning_rate, qffl.min_fit_clients) == (0.2, 0.1, 1)
    trimmed = strategies.FedTrimmedAvg()
    assert trimmed.beta == 0.2
    krum = strategies.Krum()
    assert (krum.num_malicious_clients, krum.num_clients_to_keep) == (0, 0)
    tolerant = strategies.FaultTolerantFedAvg()
    assert (tolerant.completion_rate_fit, tolerant.completion_rate_evaluate) == (0.5, 0.5)
    dp = strategies.DifferentialPrivacyClientSideAdaptiveClipping(strategies.FedAvg(), 0.0, 10)
    assert (dp.clipping_norm, dp.target_clipped_quantile, dp.clip_norm_lr) == (0.1, 0.5, 0.2)
