"""FedAvg that aggregates a round only if enough of its clients delivered."""

from __future__ import annotations

from collections.abc import Callable

from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn
from ._checks import check_fraction
from .fedavg import EvaluateFn, FedAvg
from .validate import CheckedFitResults

__all__ = ["FaultTolerantFedAvg"]


class FaultTolerantFedAvg(FedAvg):
    """FedAvg that tolerates failures up to a completion rate.

    A round is aggregated (as FedAvg: ``sum_k n_k w_k / sum_k n_k``) only if its completion
    rate ``valid / (valid + failures)`` is at least ``min_completion_rate_fit`` (for
    evaluation, ``min_completion_rate_evaluate``); a result refused by the checks counts as
    a failure. Failures are otherwise always accepted.

    Paper: the FedAvg of McMahan et al., AISTATS 2017 (arXiv:1602.05629).

    Keywords and defaults are Flower 1.12's (note the minimums of 1 client, not 2).

    Args:
        min_completion_rate_fit: Minimum fraction of fit instructions that must give a
            valid result.
        min_completion_rate_evaluate: The same for evaluation.
        fraction_fit: See :class:`FedAvg` for this and the other keywords.
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 1,
        min_evaluate_clients: int = 1,
        min_available_clients: int = 1,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        min_completion_rate_fit: float = 0.5,
        min_completion_rate_evaluate: float = 0.5,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=fraction_fit,
            fraction_evaluate=fraction_evaluate,
            min_fit_clients=min_fit_clients,
            min_evaluate_clients=min_evaluate_clients,
            min_available_clients=min_available_clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=on_fit_config_fn,
            on_evaluate_config_fn=on_evaluate_config_fn,
            accept_failures=True,
            initial_parameters=initial_parameters,
            fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
            evaluate_metrics_aggregation_fn=evaluate_metrics_aggregation_fn,
        )
        check_fraction("min_completion_rate_fit", min_completion_rate_fit)
        check_fraction("min_completion_rate_evaluate", min_completion_rate_evaluate)
        self.completion_rate_fit = min_completion_rate_fit
        self.completion_rate_evaluate = min_completion_rate_evaluate

    def __repr__(self) -> str:
        return "FaultTolerantFedAvg()"

    def refuse_round(self, checked: CheckedFitResults) -> str | None:
        """Refuse the round if its completion rate is below ``min_completion_rate_fit``."""
        return _completion(
            len(checked.accepted), len(checked.failures), self.completion_rate_fit, "fit"
        )

    def refuse_evaluate_round(self, num_valid: int, num_failures: int) -> str | None:
        """Refuse the evaluation if its completion rate is below the minimum."""
        return _completion(num_valid, num_failures, self.completion_rate_evaluate, "evaluate")


def _completion(valid: int, failures: int, minimum: float, kind: str) -> str | None:
    rate = valid / (valid + failures) if valid + failures else 0.0
    if rate >= minimum:
        return None
    return (
        f"completion rate {rate:.4g} ({valid} valid result(s), {failures} failure(s)) is "
        f"below min_completion_rate_{kind}={minimum}"
    )
