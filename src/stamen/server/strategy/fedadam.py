"""FedAdam: FedOpt with an Adam server optimizer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArray
from .fedavg import EvaluateFn
from .fedopt import FedOpt

__all__ = ["FedAdam"]


class FedAdam(FedOpt):
    """FedAdam: Adam steps on the server, with the clients' mean update as the gradient.

    With ``Delta_t = a_t - x_t`` (FedAvg mean minus current model)::

        m_t = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t                  (m_0 = 0)
        v_t = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t^2                (v_0 = 0)
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

    No bias correction (as in the paper's algorithm and in Flower 1.12).

    Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295).

    State: ``current_weights``, ``m_t``, ``v_t`` (see :class:`FedOpt`). Keywords and
    defaults are Flower 1.12's; ``initial_parameters`` is required.

    Args:
        eta: Server learning rate.
        eta_l: Client learning rate (unused by the server).
        beta_1: Momentum of ``m_t``.
        beta_2: Decay of ``v_t``.
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
        accept_failures: bool = True,
        initial_parameters: Parameters,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
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
            beta_1=beta_1,
            beta_2=beta_2,
            tau=tau,
        )

    def second_moment(self, v: NDArray, delta: NDArray) -> NDArray:
        """``v_t = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t^2``."""
        square = np.multiply(delta, delta)
        return self.beta_2 * v + (1 - self.beta_2) * square
