"""Krum and multi-Krum: keep the client models closest to their neighbours."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArrays
from ._checks import check_count
from .aggregate import aggregate_krum
from .fedavg import EvaluateFn, FedAvg, fit_results_of
from .validate import CheckedFitResults

__all__ = ["Krum"]

logger = logging.getLogger("stamen.server")


class Krum(FedAvg):
    """Krum: the client model with the smallest sum of distances to its nearest neighbours.

    With ``K`` results of which at most ``f`` are Byzantine, the score of model ``i`` is::

        s(i) = sum of ||w_i - w_j||^2 over the max(1, K - f - 2) models j != i closest to w_i

    Krum returns the model with the lowest score (the first on a tie). Multi-Krum
    (``num_clients_to_keep = m > 0``) returns the FedAvg mean, weighted by examples, of the
    ``m`` models with the lowest scores. Krum's guarantee needs ``K >= 2f + 3``; with fewer
    results the rule still runs, and a warning is logged.

    Paper: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017 (arXiv:1703.02757).

    Memory: Krum needs all the results' models at once, and ``K^2`` distances.

    Keywords and defaults are Flower 1.12's. Beyond Flower: a ``num_clients_to_keep``
    larger than the number of results keeps all of them (Flower silently keeps fewer).

    Args:
        num_malicious_clients: ``f``, the number of Byzantine clients to tolerate.
        num_clients_to_keep: ``m``; 0 is Krum, ``m > 0`` multi-Krum.
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
        num_malicious_clients: int = 0,
        num_clients_to_keep: int = 0,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        accept_failures: bool = True,
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
            accept_failures=accept_failures,
            initial_parameters=initial_parameters,
            fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
            evaluate_metrics_aggregation_fn=evaluate_metrics_aggregation_fn,
        )
        check_count("num_malicious_clients", num_malicious_clients)
        check_count("num_clients_to_keep", num_clients_to_keep)
        self.num_malicious_clients = num_malicious_clients
        self.num_clients_to_keep = num_clients_to_keep

    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays:
        """Krum (or multi-Krum) over the valid results."""
        results = fit_results_of(checked)
        if len(results) < 2 * self.num_malicious_clients + 3:
            logger.warning(
                "round %s: Krum with num_malicious_clients=%d needs at least %d results for "
                "its guarantee, has %d",
                server_round,
                self.num_malicious_clients,
                2 * self.num_malicious_clients + 3,
                len(results),
            )
        return aggregate_krum(results, self.num_malicious_clients, self.num_clients_to_keep)
