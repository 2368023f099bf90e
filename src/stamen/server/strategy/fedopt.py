"""FedOpt: the family of adaptive server optimizers (FedAdagrad, FedAdam, FedYogi)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import ConfigError, RunError
from ...messages import Parameters
from ...typing import Config, MetricsAggregationFn, NDArray, NDArrays
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

__all__ = ["FedOpt"]


class FedOpt(FedAvg):
    """Adaptive federated optimization: the base of FedAdagrad, FedAdam and FedYogi.

    The server treats ``Delta_t = a_t - x_t`` — the FedAvg mean ``a_t`` of the clients'
    models minus the current model ``x_t`` — as a pseudo-gradient and takes an adaptive
    step (no bias correction)::

        m_t = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t          (m_0 = 0)
        v_t = <rule of the subclass>(v_{t-1}, Delta_t)           (v_0 = 0)
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

    FedOpt itself, as in Flower 1.12, takes no step: it aggregates as FedAvg. Use a
    subclass.

    Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295).

    State (:meth:`state_dict`): ``current_weights`` (``x_t``), ``m_t`` and ``v_t``, in
    float64; the model sent to clients is cast to the layers' dtypes. Memory: the mean is a
    running sum, as in FedAvg.

    Keywords and defaults are Flower 1.12's; ``initial_parameters`` is required.

    Args:
        initial_parameters: The initial model ``x_1`` (required).
        eta: Server learning rate.
        eta_l: Client learning rate (kept for the clients' configuration; unused here).
        beta_1: Momentum of ``m_t``.
        beta_2: Decay of ``v_t``.
        tau: Adaptivity ``tau > 0``: the larger, the closer to SGD.
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
        initial_parameters: Parameters,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.0,
        beta_2: float = 0.0,
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
        )
        check_number("eta", eta)
        check_number("eta_l", eta_l)
        check_number("beta_1", beta_1, minimum=0.0, maximum=1.0)
        check_number("beta_2", beta_2, minimum=0.0, maximum=1.0)
        check_number("tau", tau, minimum=0.0, exclusive_minimum=True)
        initial = decode_model("initial_parameters", initial_parameters)
        self.current_weights: NDArrays = as_work(initial)
        self.model_dtypes: list[np.dtype[Any]] | None = [a.dtype for a in initial]
        self.eta = eta
        self.eta_l = eta_l
        self.tau = tau
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.m_t: NDArrays | None = None
        self.v_t: NDArrays | None = None

    def second_moment(self, v: NDArray, delta: NDArray) -> NDArray | None:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t``: each optimizer's rule (None: no step)."""
        return None

    def server_update(self, server_round: int, aggregated: NDArrays) -> NDArrays:
        """The adaptive step from the FedAvg mean to ``x_{t+1}`` (FedOpt itself: none)."""
        if type(self).second_moment is FedOpt.second_moment:
            return aggregated
        return self.adaptive_step(aggregated)

    def adaptive_step(self, aggregated: NDArrays) -> NDArrays:
        """Update ``m_t``, ``v_t`` and ``x_t`` from the FedAvg mean; return ``x_{t+1}``."""
        current = self.current_weights
        check_same_layout(type(self).__name__, aggregated, current)
        delta = arrays_of(a - x for a, x in zip(as_work(aggregated), current, strict=True))
        m_prev = self.m_t if self.m_t is not None else [np.zeros_like(d) for d in delta]
        v_prev = self.v_t if self.v_t is not None else [np.zeros_like(d) for d in delta]
        self.m_t = arrays_of(
            np.multiply(self.beta_1, m) + (1 - self.beta_1) * d
            for m, d in zip(m_prev, delta, strict=True)
        )
        v_t: NDArrays = []
        for v, d in zip(v_prev, delta, strict=True):
            moment = self.second_moment(v, d)
            if moment is None:
                raise RunError(f"{type(self).__name__} has no second-moment rule")
            v_t.append(np.asarray(moment))
        self.v_t = v_t
        self.current_weights = arrays_of(
            x + self.eta * m / (np.sqrt(v) + self.tau)
            for x, m, v in zip(current, self.m_t, self.v_t, strict=True)
        )
        self.model_dtypes = step_dtypes(self.model_dtypes, aggregated)
        return [
            cast_like(x, d) for x, d in zip(self.current_weights, self.model_dtypes, strict=True)
        ]

    def state_dict(self) -> StrategyState:
        """``current_weights``, ``m_t`` and ``v_t`` (the moments once set), in float64."""
        state = StrategyState(arrays={"current_weights": [a.copy() for a in self.current_weights]})
        if self.m_t is not None:
            state.arrays["m_t"] = [a.copy() for a in self.m_t]
        if self.v_t is not None:
            state.arrays["v_t"] = [a.copy() for a in self.v_t]
        if self.model_dtypes is not None:
            state.values["model_dtypes"] = [d.str for d in self.model_dtypes]
        return state

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore ``current_weights``, ``m_t`` and ``v_t``."""
        name = type(self).__name__
        state.check_keys(name, arrays={"current_weights", "m_t", "v_t"}, values={"model_dtypes"})
        current = load_arrays(name, state, "current_weights")
        if current is None:
            raise ConfigError(f"{name}.load_state_dict: the state has no current_weights")
        m_t = load_arrays(name, state, "m_t")
        v_t = load_arrays(name, state, "v_t")
        for moment in (m_t, v_t):
            if moment is not None:
                check_same_layout(f"{name}.load_state_dict", moment, current)
        self.current_weights, self.m_t, self.v_t = current, m_t, v_t
        self.model_dtypes = dtypes_of_state(name, state)
