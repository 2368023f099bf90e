"""What the four differential-privacy wrappers share: delegation, checks, noise, state."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from ...errors import ConfigError
from ...messages import EvaluateIns, FitIns, FitRes, Parameters
from ...ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from ...privacy import (
    add_gaussian_noise,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
    rng_state,
    set_rng_state,
)
from ...typing import NDArrays, Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from ..spill import release, spilled_like
from ._checks import check_count, check_number
from .state import StrategyState
from .strategy import EvaluateFailures, EvaluateResults, FitFailures, FitResults, Strategy
from .validate import CheckedFitResults, ModelLayout, validate_fit_results

__all__ = ["DPWrapperBase"]

logger = logging.getLogger("stamen.server")

# A client-side clipped update may exceed the norm by float rounding; beyond this, the
# server clips it again.
_CLIENT_NORM_TOLERANCE = 1e-6


def clipped_parameters(fit_res: FitRes, arrays: NDArrays, clipped: NDArrays) -> Parameters:
    """A result's clipped model as its new parameters, spilled to disk if the result was
    (clipped results wait where the results waited); the result's own pages let go."""
    for array in arrays:
        release(array)
    return spilled_like(fit_res.parameters, ndarrays_to_parameters(clipped))


class DPWrapperBase(Strategy):
    """Base of the DP wrappers: delegates to ``strategy``; noise, checks and state.

    A round with any failure — including a result refused by the checks — is not
    aggregated: fewer contributions than ``num_sampled_clients`` would weaken the privacy
    guarantee the noise is calibrated for (as in Flower).

    The noise comes from the wrapper's own ``numpy.random.Generator``, seeded with ``seed``
    (None: fresh OS entropy). The generator's state is part of :meth:`state_dict` only when
    a seed was given: noise that a checkpoint could replay protects nothing, so an
    unseeded wrapper draws fresh noise after a restart.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        seed: int | None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                f"strategy: expected a Strategy to wrap, received {type(strategy).__name__}"
            )
        check_number("noise_multiplier", noise_multiplier, minimum=0.0)
        check_count("num_sampled_clients", num_sampled_clients, minimum=1)
        if seed is not None:
            check_count("seed", seed)
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.num_sampled_clients = num_sampled_clients
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.current_round_params: NDArrays = []

    # --- delegation ------------------------------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The wrapped strategy's initial parameters."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's instructions; the global model is kept for clipping."""
        self.current_round_params = parameters_to_ndarrays(parameters)
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The wrapped strategy's evaluation instructions."""
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """The wrapped strategy's evaluation aggregate."""
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """The wrapped strategy's centralized evaluation."""
        return self.strategy.evaluate(server_round, parameters)

    # --- checks ----------------------------------------------------------------------------

    def round_refused(self, server_round: int, results: FitResults, failures: FitFailures) -> bool:
        """True (and logged) if the round must not be aggregated: no results or failures."""
        if not results:
            return True
        if failures:
            logger.warning(
                "round %s: %d failure(s): a differentially private round is aggregated only "
                "without failures",
                server_round,
                len(failures),
            )
            return True
        if len(results) != self.num_sampled_clients:
            logger.warning(
                "round %s: %d results but num_sampled_clients=%d: the noise is calibrated for "
                "%d clients, so the privacy guarantee differs from the configured one",
                server_round,
                len(results),
                self.num_sampled_clients,
                self.num_sampled_clients,
            )
        return False

    def valid_results(
        self, server_round: int, results: FitResults
    ) -> list[tuple[ClientProxy, FitRes, NDArrays]] | None:
        """The decoded results checked against the global model; None if any is refused."""
        reference = ModelLayout.of(self.current_round_params) if self.current_round_params else None
        valid, refused = validate_fit_results(server_round, results, [], reference)
        if refused:
            logger.warning(
                "round %s: %d result(s) refused: a differentially private round is aggregated "
                "only without failures",
                server_round,
                len(refused),
            )
            return None
        return valid

    def enforce_client_clipping(
        self, server_round: int, results: FitResults, clipping_norm: float
    ) -> tuple[FitResults, list[bool]] | None:
        """Check the clients' clipping; clip again any update over ``clipping_norm``.

        Returns:
            The results (a re-clipped one replaced) and, per result, whether the server had
            to clip it; None if a result was refused by the checks. Without a global model
            (no ``configure_fit``) the clipping cannot be checked and is trusted.
        """
        reference = ModelLayout.of(self.current_round_params) if self.current_round_params else None
        checked = CheckedFitResults(server_round, results, [], reference)
        out: FitResults = []
        reclipped: list[bool] = []
        for proxy, fit_res, arrays in checked:
            over = False
            if self.current_round_params:
                update = [
                    np.subtract(a, r, dtype=np.float64)
                    for a, r in zip(arrays, self.current_round_params, strict=True)
                ]
                over = get_norm(update) > clipping_norm * (1 + _CLIENT_NORM_TOLERANCE)
            if over:
                logger.warning(
                    "round %s: the update of client %s exceeds the clipping norm %.6g: the "
                    "server clips it",
                    server_round,
                    proxy.cid,
                    clipping_norm,
                )
                clipped, _ = compute_clip_model_update(
                    arrays, self.current_round_params, clipping_norm
                )
                fit_res = replace(fit_res, parameters=clipped_parameters(fit_res, arrays, clipped))
            out.append((proxy, fit_res))
            reclipped.append(over)
        if checked.refused:
            logger.warning(
                "round %s: %d result(s) refused: a differentially private round is aggregated "
                "only without failures",
                server_round,
                len(checked.refused),
            )
            return None
        return out, reclipped

    # --- noise and state -------------------------------------------------------------------

    def add_noise(self, parameters: Parameters, clipping_norm: float) -> Parameters:
        """``parameters`` plus Gaussian noise of std ``noise_multiplier * C / m``."""
        std = compute_stdv(self.noise_multiplier, clipping_norm, self.num_sampled_clients)
        noised = add_gaussian_noise(parameters_to_ndarrays(parameters), std, self.rng)
        logger.info("central DP noise with standard deviation %.6g added", std)
        return ndarrays_to_parameters(noised)

    def wrapper_state(self) -> StrategyState:
        """The wrapped strategy's state under ``strategy/``, and the seeded RNG's state."""
        state = StrategyState()
        state.nest("strategy", self.strategy.state_dict())
        if self.seed is not None:
            state.values["rng"] = rng_state(self.rng)
        return state

    def load_wrapper_state(self, state: StrategyState, values: set[str]) -> StrategyState:
        """Restore the wrapped strategy and the RNG; return this wrapper's own entries."""
        inner, own = state.unnest("strategy")
        own.check_keys(type(self).__name__, arrays=set(), values=values | {"rng"})
        self.strategy.load_state_dict(inner)
        rng = own.values.get("rng")
        if rng is not None:
            if not isinstance(rng, str):
                raise ConfigError(f"{type(self).__name__}: rng state must be a str")
            set_rng_state(self.rng, rng)
        return own
