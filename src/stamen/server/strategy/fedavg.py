"""Federated Averaging (FedAvg)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...errors import ConfigError, DecodeError, RunError
from ...messages import Code, EvaluateIns, FitIns, Parameters
from ...ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from ...typing import Config, MetricsAggregationFn, NDArrays, Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from .aggregate import aggregate, weighted_loss_avg
from .strategy import EvaluateFailures, EvaluateResults, FitFailures, FitResults, Strategy

__all__ = ["FedAvg"]

logger = logging.getLogger("stamen.server")

EvaluateFn = Callable[[int, NDArrays, Config], tuple[float, dict[str, Scalar]] | None]


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: expected a number in [0, 1], received {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}: expected an int >= 0, received {value!r}")


class FedAvg(Strategy):
    """Federated Averaging: the weighted mean of client models.

    ``w_{t+1} = sum_k n_k w_k / sum_k n_k`` over the clients k of round t, where ``n_k`` is
    the number of examples client k trained on. McMahan et al., "Communication-Efficient
    Learning of Deep Networks from Decentralized Data", AISTATS 2017.

    Keywords and defaults are Flower 1.12's. Each round samples
    ``max(int(available * fraction), min_clients)`` clients.

    Args:
        fraction_fit: Fraction of available clients sampled for training.
        fraction_evaluate: Fraction sampled for evaluation (0 disables it).
        min_fit_clients: Minimum number of clients sampled for training.
        min_evaluate_clients: Minimum number sampled for evaluation.
        min_available_clients: Clients that must be connected before a round starts.
        evaluate_fn: ``evaluate_fn(server_round, ndarrays, config) -> (loss, metrics)`` for
            centralized evaluation.
        on_fit_config_fn: ``fn(server_round) -> config`` sent with each FitIns.
        on_evaluate_config_fn: ``fn(server_round) -> config`` sent with each EvaluateIns.
        accept_failures: If False, a round with any failure is not aggregated.
        initial_parameters: Initial global model (None: ask one client).
        fit_metrics_aggregation_fn: Aggregates ``[(num_examples, metrics)]`` of fits.
        evaluate_metrics_aggregation_fn: The same for evaluations.
        inplace: Accepted for compatibility; aggregation always uses one running sum.
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
        inplace: bool = True,
    ) -> None:
        _check_fraction("fraction_fit", fraction_fit)
        _check_fraction("fraction_evaluate", fraction_evaluate)
        _check_count("min_fit_clients", min_fit_clients)
        _check_count("min_evaluate_clients", min_evaluate_clients)
        _check_count("min_available_clients", min_available_clients)
        if initial_parameters is not None and not isinstance(initial_parameters, Parameters):
            raise ConfigError(
                "initial_parameters: expected Parameters (see ndarrays_to_parameters), "
                f"received {type(initial_parameters).__name__}"
            )
        if min_fit_clients > min_available_clients or min_evaluate_clients > min_available_clients:
            logger.warning(
                "min_fit_clients (%s) or min_evaluate_clients (%s) exceeds "
                "min_available_clients (%s): rounds may wait for more clients than needed",
                min_fit_clients,
                min_evaluate_clients,
                min_available_clients,
            )
        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        self.min_fit_clients = min_fit_clients
        self.min_evaluate_clients = min_evaluate_clients
        self.min_available_clients = min_available_clients
        self.evaluate_fn = evaluate_fn
        self.on_fit_config_fn = on_fit_config_fn
        self.on_evaluate_config_fn = on_evaluate_config_fn
        self.accept_failures = accept_failures
        self.initial_parameters = initial_parameters
        self.fit_metrics_aggregation_fn = fit_metrics_aggregation_fn
        self.evaluate_metrics_aggregation_fn = evaluate_metrics_aggregation_fn
        self.inplace = inplace

    def __repr__(self) -> str:
        return f"FedAvg(accept_failures={self.accept_failures})"

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Return (sample size, minimum number of available clients) for training."""
        num_clients = int(num_available_clients * self.fraction_fit)
        return max(num_clients, self.min_fit_clients), self.min_available_clients

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Return (sample size, minimum number of available clients) for evaluation."""
        num_clients = int(num_available_clients * self.fraction_evaluate)
        return max(num_clients, self.min_evaluate_clients), self.min_available_clients

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Hand out ``initial_parameters`` once (then drop them to free memory)."""
        initial = self.initial_parameters
        self.initial_parameters = None
        return initial

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Run ``evaluate_fn`` on the global parameters, if one is set."""
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(server_round, parameters_to_ndarrays(parameters), {})

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients; every one gets the same FitIns (encoded once)."""
        config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
        fit_ins = FitIns(parameters, config)
        sample_size, min_num = self.num_fit_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=sample_size, min_num_clients=min_num)
        return [(client, fit_ins) for client in clients]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Sample clients for evaluation (none when ``fraction_evaluate == 0``)."""
        if self.fraction_evaluate == 0.0:
            return []
        config = self.on_evaluate_config_fn(server_round) if self.on_evaluate_config_fn else {}
        evaluate_ins = EvaluateIns(parameters, config)
        sample_size, min_num = self.num_evaluation_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=sample_size, min_num_clients=min_num)
        return [(client, evaluate_ins) for client in clients]

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Weighted mean of the results' parameters; fit metrics through the hook."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            logger.warning(
                "round %s: %d failure(s) and accept_failures=False: not aggregating",
                server_round,
                len(failures),
            )
            return None, {}
        decoded: list[tuple[NDArrays, int]] = []
        for proxy, fit_res in results:
            if fit_res.status.code != Code.OK:
                continue
            try:
                decoded.append((parameters_to_ndarrays(fit_res.parameters), fit_res.num_examples))
            except DecodeError as exc:
                logger.warning("round %s: dropping result of %s: %s", server_round, proxy.cid, exc)
        if not decoded:
            return None, {}
        try:
            parameters = ndarrays_to_parameters(aggregate(decoded))
        except RunError as exc:
            logger.error("round %s: cannot aggregate: %s", server_round, exc)
            return None, {}
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn is not None:
            metrics = self.fit_metrics_aggregation_fn(
                [(r.num_examples, r.metrics) for _, r in results]
            )
        return parameters, metrics

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Loss averaged by examples; evaluation metrics through the hook."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        try:
            loss = weighted_loss_avg([(r.num_examples, r.loss) for _, r in results])
        except RunError as exc:
            logger.error("round %s: cannot average losses: %s", server_round, exc)
            return None, {}
        metrics: dict[str, Scalar] = {}
        if self.evaluate_metrics_aggregation_fn is not None:
            metrics = self.evaluate_metrics_aggregation_fn(
                [(r.num_examples, r.metrics) for _, r in results]
            )
        return loss, metrics
