"""FedTrimmedAvg: the coordinate-wise trimmed mean of the client models."""

from __future__ import annotations

from collections.abc import Callable

from ...errors import ConfigError
from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArrays
from .aggregate import aggregate_trimmed_avg
from .fedavg import EvaluateFn, FedAvg, fit_results_of
from .validate import CheckedFitResults

__all__ = ["FedTrimmedAvg"]


class FedTrimmedAvg(FedAvg):
    """Coordinate-wise trimmed mean: drop the extremes of each parameter, average the rest.

    With ``K`` results and ``c = int(beta * K)``, each parameter is the mean of its values
    ranked ``c + 1`` to ``K - c`` (the ``c`` smallest and ``c`` largest are dropped). The
    numbers of examples are ignored. Robust to up to ``c`` clients sending arbitrary values.

    Paper: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (arXiv:1803.01498).

    Memory: the trimmed mean needs all the results' models at once.

    Keywords and defaults are Flower 1.12's.

    Args:
        beta: Fraction cut from each tail, in [0, 0.5).
        fraction_fit: See :class:`FedAvg` for this and the other keywords.
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        beta: float = 0.2,
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
            accept_failures=accept_failures,
            initial_parameters=initial_parameters,
            fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
            evaluate_metrics_aggregation_fn=evaluate_metrics_aggregation_fn,
        )
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ConfigError(f"beta: expected a number in [0, 0.5), received {beta!r}")
        self.beta = beta

    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays:
        """The coordinate-wise trimmed mean of the valid results."""
        return aggregate_trimmed_avg(fit_results_of(checked), self.beta)
