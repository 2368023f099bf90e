"""FedAdagrad: FedOpt with an Adagrad server optimizer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArray
from .fedavg import EvaluateFn
from .fedopt import FedOpt

__all__ = ["FedAdagrad"]


class FedAdagrad(FedOpt):
    """FedAdagrad: adaptive server steps that shrink with the accumulated squared updates.

    With ``Delta_t = a_t - x_t`` (FedAvg mean minus current model)::

        m_t = Delta_t                      (beta_1 = 0)
        v_t = v_{t-1} + Delta_t^2          (v_0 = 0)
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

    Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295).

    State: ``current_weights``, ``m_t``, ``v_t`` (see :class:`FedOpt`). Keywords and
    defaults are Flower 1.12's (no ``beta_1``/``beta_2``); ``initial_parameters`` is
    required.

    Args:
        eta: Server learning rate.
        eta_l: Client learning rate (unused by the server).
        tau: Adaptivity ``tau > 0``.
        initial_parameters: See :class:`FedOpt` and :class:`FedAvg` for the other keywords.
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
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        tau: float = 1e-9,
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
            eta=eta,
            eta_l=eta_l,
            beta_1=0.0,
            beta_2=0.0,
            tau=tau,
        )

    def second_moment(self, v: NDArray, delta: NDArray) -> NDArray:
        """``v_t = v_{t-1} + Delta_t^2``."""
        return v + np.multiply(delta, delta)
