"""FedAvgM: FedAvg with server-side momentum."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import RunError
from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArrays
from ._arrays import (
    arrays_of,
    as_work,
    check_same_layout,
    decode_model,
    dtypes_of_state,
    load_arrays,
    step_dtypes,
)
from ._checks import check_number
from .aggregate import cast_like
from .fedavg import EvaluateFn, FedAvg
from .state import StrategyState

__all__ = ["FedAvgM"]


class FedAvgM(FedAvg):
    """Federated Averaging with server momentum.

    With the FedAvg mean ``a_t = sum_k n_k w_k / sum_k n_k``, the server takes an SGD step
    with momentum (PyTorch's convention, no Nesterov) on the pseudo-gradient::

        g_t = w_t - a_t
        v_t = beta * v_{t-1} + g_t        (v_1 = g_1; only if beta > 0, else v_t = g_t)
        w_{t+1} = w_t - eta * v_t

    with ``eta = server_learning_rate`` and ``beta = server_momentum``. With the defaults
    (``eta = 1``, ``beta = 0``) this is FedAvg: ``w_{t+1} = a_t``.

    Paper: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification", 2019 (arXiv:1909.06335).

    State (:meth:`state_dict`): ``current_weights`` (``w_t``) and ``momentum_vector``
    (``v_t``), in float64. Memory: the mean is a running sum, as in FedAvg.

    Keywords and defaults are Flower 1.12's. Beyond Flower: without
    ``initial_parameters``, ``w_1`` is the global model of the first ``configure_fit``
    (Flower fails an assertion).

    Args:
        server_learning_rate: Server step size ``eta``.
        server_momentum: Momentum ``beta >= 0``.
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
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
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
        check_number("server_learning_rate", server_learning_rate)
        check_number("server_momentum", server_momentum, minimum=0.0)
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.server_opt: bool = server_momentum != 0.0 or server_learning_rate != 1.0
        self.momentum_vector: NDArrays | None = None
        self.current_weights: NDArrays | None = None
        self.model_dtypes: list[np.dtype[Any]] | None = None
        if initial_parameters is not None and self.server_opt:
            initial = decode_model("initial_parameters", initial_parameters)
            self.current_weights = as_work(initial)
            self.model_dtypes = [a.dtype for a in initial]

    def observe_global_model(self, parameters: Parameters) -> None:
        """Remember the global model; the first one starts ``w_t`` if none was given."""
        super().observe_global_model(parameters)
        if self.server_opt and self.current_weights is None:
            model = decode_model("global model", parameters)
            self.current_weights = as_work(model)
            self.model_dtypes = [a.dtype for a in model]

    def server_update(self, server_round: int, aggregated: NDArrays) -> NDArrays:
        """The momentum step from the FedAvg mean to ``w_{t+1}``."""
        if not self.server_opt:
            return aggregated
        current = self.current_weights
        if current is None:
            raise RunError(
                "FedAvgM with a server learning rate or momentum needs the global model: "
                "give initial_parameters, or call configure_fit before aggregate_fit"
            )
        check_same_layout("FedAvgM", aggregated, current)
        gradient = arrays_of(w - a for w, a in zip(current, as_work(aggregated), strict=True))
        if self.server_momentum > 0.0:
            if self.momentum_vector is None:
                self.momentum_vector = gradient
            else:
                self.momentum_vector = arrays_of(
                    self.server_momentum * v + g
                    for v, g in zip(self.momentum_vector, gradient, strict=True)
                )
            gradient = self.momentum_vector
        self.current_weights = arrays_of(
            w - self.server_learning_rate * g for w, g in zip(current, gradient, strict=True)
        )
        self.model_dtypes = step_dtypes(self.model_dtypes, aggregated)
        return [
            cast_like(w, d) for w, d in zip(self.current_weights, self.model_dtypes, strict=True)
        ]

    def state_dict(self) -> StrategyState:
        """``current_weights`` and ``momentum_vector`` (each when set), in float64."""
        state = StrategyState()
        if self.current_weights is not None:
            state.arrays["current_weights"] = [a.copy() for a in self.current_weights]
        if self.momentum_vector is not None:
            state.arrays["momentum_vector"] = [a.copy() for a in self.momentum_vector]
        if self.model_dtypes is not None:
            state.values["model_dtypes"] = [d.str for d in self.model_dtypes]
        return state

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore ``current_weights`` and ``momentum_vector``."""
        state.check_keys(
            "FedAvgM", arrays={"current_weights", "momentum_vector"}, values={"model_dtypes"}
        )
        current = load_arrays("FedAvgM", state, "current_weights")
        momentum = load_arrays("FedAvgM", state, "momentum_vector")
        if current is not None and momentum is not None:
            check_same_layout("FedAvgM.load_state_dict", momentum, current)
        self.current_weights = current
        self.momentum_vector = momentum
        self.model_dtypes = dtypes_of_state("FedAvgM", state)
