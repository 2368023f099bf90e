"""QFedAvg: q-Fair Federated Learning (q-FFL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ...errors import ConfigError, RunError
from ...messages import FitIns, Parameters
from ...ndarrays import parameters_to_ndarrays
from ...typing import Config, MetricsAggregationFn, NDArrays
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from ._arrays import as_work
from ._checks import check_number
from .aggregate import aggregate_qffl
from .fedavg import EvaluateFn, FedAvg, no_valid_result
from .validate import CheckedFitResults, ModelLayout

__all__ = ["QFedAvg"]

_EPSILON = 1e-10


class QFedAvg(FedAvg):
    """q-FFL: a step that weighs clients with a high loss more (fairness).

    With the global model ``w_t``, the clients' models ``w_k``, ``L = 1 / lr`` (the inverse
    of ``qffl_learning_rate``) and ``F = loss + 1e-10``, where ``loss`` is the loss of
    ``w_t`` given by ``evaluate_fn``::

        g_k = L * (w_t - w_k)
        Delta_k = F^q * g_k
        h_k = q * F^(q-1) * ||g_k||^2 + L * F^q
        w_{t+1} = w_t - sum_k Delta_k / sum_k h_k

    ``q = 0`` weighs all clients alike; larger ``q`` favours the worse-off ones.

    Paper: Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in Federated
    Learning", ICLR 2020 (arXiv:1905.10497). The paper takes each client's own loss
    ``F_k(w_t)``; Flower 1.12, and so Stamen, take one loss for all: the centralized loss of
    ``w_t`` from ``evaluate_fn``, which QFedAvg therefore needs (Flower fails with an
    ``UnboundLocalError`` without it; Stamen raises a ConfigError in ``configure_fit``).

    Memory: a running sum of the ``Delta_k`` (one accumulator), plus ``w_t``.

    Keywords and defaults are Flower 1.12's (note the minimums of 1 client).

    Args:
        q_param: ``q >= 0``.
        qffl_learning_rate: ``lr > 0``; ``L = 1 / lr``.
        fraction_fit: See :class:`FedAvg` for this and the other keywords.
    """

    def __init__(
        self,
        *,
        q_param: float = 0.2,
        qffl_learning_rate: float = 0.1,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 1,
        min_evaluate_clients: int = 1,
        min_available_clients: int = 1,
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
        check_number("q_param", q_param, minimum=0.0)
        check_number("qffl_learning_rate", qffl_learning_rate, minimum=0.0, exclusive_minimum=True)
        self.learning_rate = qffl_learning_rate
        self.q_param = q_param
        self.pre_weights: NDArrays | None = None

    def __repr__(self) -> str:
        return f"QFedAvg(learning_rate={self.learning_rate}, q_param={self.q_param})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's instructions; the global model is kept as ``w_t``.

        Raises:
            ConfigError: no ``evaluate_fn`` (q-FFL needs the loss of the global model).
        """
        if self.evaluate_fn is None:
            raise ConfigError(
                "QFedAvg: evaluate_fn is required: q-FFL weighs each update by the loss of "
                "the global model, which evaluate_fn gives (as in Flower 1.12)"
            )
        return super().configure_fit(server_round, parameters, client_manager)

    def observe_global_model(self, parameters: Parameters) -> None:
        """Keep the global model as ``w_t`` (the base of the q-FFL step)."""
        super().observe_global_model(parameters)
        self.pre_weights = parameters_to_ndarrays(parameters)

    def reference_layout(self) -> ModelLayout | None:
        """The layout of ``w_t`` (no second decoding)."""
        if self.pre_weights is None:
            return super().reference_layout()
        return ModelLayout.of(self.pre_weights) if self.pre_weights else None

    def _loss(self, server_round: int, weights: NDArrays) -> float:
        if self.evaluate_fn is None:
            raise RunError("QFedAvg needs evaluate_fn for the loss of the global model")
        result = self.evaluate_fn(server_round, [a.copy() for a in weights], {})
        if result is None:
            raise RunError("QFedAvg: evaluate_fn returned None, so the global model has no loss")
        loss = float(result[0])
        if not np.isfinite(loss) or loss + _EPSILON <= 0:
            raise RunError(f"QFedAvg: the loss of the global model must be >= 0, is {loss!r}")
        return loss

    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays:
        """The q-FFL step from ``w_t`` over the valid results."""
        if self.pre_weights is None:
            raise RunError("QFedAvg: no global model; call configure_fit before aggregate_fit")
        weights = self.pre_weights
        base = self._loss(server_round, weights) + _EPSILON
        q = self.q_param
        lipschitz = 1.0 / self.learning_rate
        f_q = float(np.float_power(base, q))
        f_q1 = float(np.float_power(base, q - 1))
        work = as_work(weights)
        hs: list[float] = []

        def deltas() -> Iterator[NDArrays]:
            for _, _, arrays in checked:
                grads = [(w - a) * lipschitz for w, a in zip(work, arrays, strict=True)]
                norm_sq = float(sum(np.sum(np.abs(g) ** 2) for g in grads))
                hs.append(q * f_q1 * norm_sq + lipschitz * f_q)
                yield [f_q * g for g in grads]

        try:
            return aggregate_qffl(weights, deltas(), hs)
        except RunError:
            if not checked.accepted:
                raise RunError(no_valid_result(checked)) from None
            raise
