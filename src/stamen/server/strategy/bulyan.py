"""Bulyan: Krum selection followed by a coordinate-wise trimmed mean around the median."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArrays
from ._checks import check_count
from .aggregate import aggregate_bulyan, aggregate_krum, check_bulyan_rule
from .fedavg import EvaluateFn, FedAvg, fit_results_of
from .validate import CheckedFitResults

__all__ = ["Bulyan"]


class Bulyan(FedAvg):
    """Bulyan: select with Krum, then average the values closest to the median.

    With ``K`` results of which at most ``f`` are Byzantine (``K >= 4f + 3``):

    1. Selection: ``theta = K - 2f`` times, Krum (see :class:`Krum`) picks one model among
       the remaining candidates, which moves it to the selection set.
    2. Aggregation: each coordinate ``j`` is the mean of the ``beta = theta - 2f`` values
       ``w_i[j]`` of the selection set closest to their median ``median_i w_i[j]``.

    The numbers of examples are ignored. A round with fewer than ``4f + 3`` valid results
    is not aggregated (logged; Flower raises).

    Paper: El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed
    Learning in Byzantium", ICML 2018 (arXiv:1802.07927).

    Memory: Bulyan needs all the results' models at once, and ``K^2`` distances.

    Keywords and defaults are Flower 1.12's. Beyond Flower: the default works (Flower's
    default rule fails for want of Krum's ``to_keep``), and a rule other than single-model
    Krum is refused when the strategy is built.

    Args:
        num_malicious_clients: ``f``.
        first_aggregation_rule: The selection rule; only
            :func:`~stamen.server.strategy.aggregate.aggregate_krum` selects a model.
        **aggregation_rule_kwargs: Extra arguments of the rule: only ``to_keep=0``.
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
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        first_aggregation_rule: Callable[..., NDArrays] = aggregate_krum,
        **aggregation_rule_kwargs: Any,
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
        check_bulyan_rule(first_aggregation_rule, aggregation_rule_kwargs)
        self.num_malicious_clients = num_malicious_clients
        self.first_aggregation_rule = first_aggregation_rule
        self.aggregation_rule_kwargs = aggregation_rule_kwargs

    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays:
        """Bulyan over the valid results."""
        return aggregate_bulyan(
            fit_results_of(checked),
            self.num_malicious_clients,
            self.first_aggregation_rule,
            **self.aggregation_rule_kwargs,
        )
