"""Central differential privacy with an adaptive clipping norm, clipped on server or clients."""

from __future__ import annotations

import logging
from dataclasses import replace

from ...errors import ConfigError
from ...messages import FitIns, Parameters
from ...privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    adaptive_clipping_norm,
    compute_adaptive_noise_params,
    compute_clip_model_update,
)
from ...typing import Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from ._checks import check_fraction, check_number
from ._dp_base import DPWrapperBase, clipped_parameters
from .fedprox import with_config
from .state import StrategyState
from .strategy import FitFailures, FitResults, Strategy

__all__ = [
    "DifferentialPrivacyClientSideAdaptiveClipping",
    "DifferentialPrivacyServerSideAdaptiveClipping",
]

logger = logging.getLogger("stamen.server")


class _AdaptiveClipping(DPWrapperBase):
    """The clipping-norm adaptation both adaptive wrappers share."""

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        *,
        seed: int | None = None,
        flower_compatible_update: bool = True,
    ) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, seed)
        check_number(
            "initial_clipping_norm", initial_clipping_norm, minimum=0.0, exclusive_minimum=True
        )
        check_fraction("target_clipped_quantile", target_clipped_quantile)
        check_number("clip_norm_lr", clip_norm_lr, minimum=0.0, exclusive_minimum=True)
        if clipped_count_stddev is not None:
            check_number("clipped_count_stddev", clipped_count_stddev, minimum=0.0)
        self.clipping_norm = float(initial_clipping_norm)
        self.target_clipped_quantile = target_clipped_quantile
        self.clip_norm_lr = clip_norm_lr
        self.flower_compatible_update = flower_compatible_update
        self.clipped_count_stddev, self.noise_multiplier = compute_adaptive_noise_params(
            noise_multiplier, num_sampled_clients, clipped_count_stddev
        )

    def adapt(self, server_round: int, clipped_count: int, num_results: int) -> None:
        """Move the clipping norm from the (noised) count of clipped updates."""
        noised = float(clipped_count)
        if self.clipped_count_stddev > 0:
            noised = float(self.rng.normal(clipped_count, self.clipped_count_stddev))
        previous = self.clipping_norm
        self.clipping_norm = adaptive_clipping_norm(
            previous,
            noised / num_results,
            self.target_clipped_quantile,
            self.clip_norm_lr,
            flower_compatible_update=self.flower_compatible_update,
        )
        logger.info(
            "round %s: %d of %d updates clipped; clipping norm %.6g -> %.6g",
            server_round,
            clipped_count,
            num_results,
            previous,
            self.clipping_norm,
        )

    def state_dict(self) -> StrategyState:
        """The clipping norm, the wrapped strategy's state, and the seeded RNG's."""
        state = self.wrapper_state()
        state.values["clipping_norm"] = self.clipping_norm
        return state

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what :meth:`state_dict` returned."""
        own = self.load_wrapper_state(state, {"clipping_norm"})
        norm = own.values.get("clipping_norm")
        if norm is not None:
            if isinstance(norm, bool) or not isinstance(norm, int | float) or not norm > 0:
                raise ConfigError(
                    f"{type(self).__name__}.load_state_dict: clipping_norm must be a number "
                    f"> 0, received {norm!r}"
                )
            self.clipping_norm = float(norm)


class DifferentialPrivacyServerSideAdaptiveClipping(_AdaptiveClipping):
    """Central DP: the server clips each update to an adaptive norm, then adds noise.

    Each client model ``w_k`` becomes ``w_t + u_k * min(1, C_t / ||u_k||_2)`` with
    ``u_k = w_k - w_t``; the wrapped strategy aggregates the clipped models. The norm
    ``C_t`` adapts to the fraction ``b_t`` of clipped updates, noised with
    ``N(0, clipped_count_stddev^2)`` on the count::

        C_{t+1} = C_t * exp(-clip_norm_lr * (b_t - target_clipped_quantile))

    The noise on the aggregate is ``N(0, (sigma' * C_t / m)^2)``, where ``sigma'`` is
    ``noise_multiplier`` raised to pay for the count noise,
    ``sigma' = (sigma^-2 - (2 * clipped_count_stddev)^-2)^(-1/2)``, and
    ``clipped_count_stddev`` defaults to ``m / 20`` (0 without noise).

    Paper: Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with
    Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871).

    **Flower compatibility, and a Flower bug.** The update rule above is Flower 1.12's; the
    default ``flower_compatible_update=True`` keeps it, so that results match Flower's. It
    moves the norm the wrong way: when more updates than the target are clipped it
    *lowers* the norm, so the norm runs away to 0 (or up) instead of tracking the target
    quantile. ``flower_compatible_update=False`` takes the paper's direction,
    ``C_{t+1} = C_t * exp(+clip_norm_lr * (b_t - target_clipped_quantile))``. Also beyond
    Flower: the noise is calibrated to ``C_t``, the norm the updates were clipped to
    (Flower takes ``C_{t+1}``, which under-noises when the norm drops).

    A round with any failure (or refused result) is not aggregated. Memory: the clipped
    results are re-encoded (a second copy of every result, as in Flower). State: the
    clipping norm, the wrapped strategy's state, and the noise generator's if seeded.

    Arguments are Flower 1.12's (positional as there); beyond Flower the keywords ``seed``
    and ``flower_compatible_update``.

    Args:
        strategy: The strategy that aggregates the clipped results.
        noise_multiplier: ``sigma >= 0``.
        num_sampled_clients: ``m``, the number of clients sampled each round.
        initial_clipping_norm: ``C_1 > 0``.
        target_clipped_quantile: Target fraction of clipped updates, in [0, 1].
        clip_norm_lr: Learning rate of the norm, > 0.
        clipped_count_stddev: Standard deviation of the count noise (None: ``m / 20``
            with noise, 0 without).
        seed: Seed of the noise generator (None: OS entropy, never saved).
        flower_compatible_update: Flower 1.12's update direction (see above).
    """

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Server-Side Adaptive Clipping)"

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Clip each update, adapt the norm, aggregate with the wrapped strategy, add noise."""
        if self.round_refused(server_round, results, failures):
            return None, {}
        valid = self.valid_results(server_round, results)
        if valid is None:
            return None, {}
        used_norm = self.clipping_norm
        clipped_results: FitResults = []
        clipped_count = 0
        for proxy, fit_res, arrays in valid:
            clipped, norm_bit = compute_clip_model_update(
                arrays, self.current_round_params, used_norm
            )
            clipped_count += int(norm_bit)
            clipped_results.append(
                (proxy, replace(fit_res, parameters=clipped_parameters(fit_res, arrays, clipped)))
            )
        self.adapt(server_round, clipped_count, len(valid))
        parameters, metrics = self.strategy.aggregate_fit(server_round, clipped_results, [])
        if parameters is not None:
            parameters = self.add_noise(parameters, used_norm)
        return parameters, metrics


class DifferentialPrivacyClientSideAdaptiveClipping(_AdaptiveClipping):
    """Central DP: the clients clip their updates to an adaptive norm; the server adds noise.

    Each fit config carries ``"clipping_norm": C_t``; each client clips its update
    ``u_k = w_k - w_t`` to ``u_k * min(1, C_t / ||u_k||_2)`` and returns ``"norm_bit"`` in
    its fit metrics, True if it had to clip (a Stamen NumPyClient wrapped in
    :class:`stamen.client.dp.AdaptiveClippingNumPyClient`, a Flower client with
    ``adaptiveclipping_mod``). The wrapped strategy aggregates; with ``b_t`` the fraction of
    set bits, noised with ``N(0, clipped_count_stddev^2)`` on the count::

        C_{t+1} = C_t * exp(-clip_norm_lr * (b_t - target_clipped_quantile))

    and the aggregate gets noise ``N(0, (sigma' * C_t / m)^2)``, with ``sigma'`` as in
    :class:`DifferentialPrivacyServerSideAdaptiveClipping` — whose notes on Flower's
    update direction (``flower_compatible_update``) and on the noise apply here too.

    Paper: Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with
    Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871).

    A round with any failure (or refused result) is not aggregated; a result without the
    ``"norm_bit"`` metric makes the round refused (Flower raises a KeyError). Beyond
    Flower: the server checks the clipping (when it knows the global model) and clips again
    an update whose norm exceeds ``C_t``, with a warning, counting it as clipped.

    Arguments are Flower 1.12's (positional as there); beyond Flower the keywords ``seed``
    and ``flower_compatible_update``.

    Args:
        strategy: The strategy that aggregates the clipped results.
        noise_multiplier: ``sigma >= 0``.
        num_sampled_clients: ``m``, the number of clients sampled each round.
        initial_clipping_norm: ``C_1 > 0``.
        target_clipped_quantile: Target fraction of clipped updates, in [0, 1].
        clip_norm_lr: Learning rate of the norm, > 0.
        clipped_count_stddev: Standard deviation of the count noise (None: ``m / 20``
            with noise, 0 without).
        seed: Seed of the noise generator (None: OS entropy, never saved).
        flower_compatible_update: Flower 1.12's update direction.
    """

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Client-Side Adaptive Clipping)"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's instructions, with ``"clipping_norm"`` in each config."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        return with_config(instructions, {KEY_CLIPPING_NORM: self.clipping_norm})

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the clipping, aggregate with the wrapped strategy, adapt the norm, noise."""
        if self.round_refused(server_round, results, failures):
            return None, {}
        missing = [p.cid for p, r in results if KEY_NORM_BIT not in r.metrics]
        if missing:
            logger.warning(
                "round %s: results of client(s) %s have no %r metric (is the client wrapped "
                "with AdaptiveClippingNumPyClient or adaptiveclipping_mod?): not aggregating",
                server_round,
                missing,
                KEY_NORM_BIT,
            )
            return None, {}
        used_norm = self.clipping_norm
        enforced = self.enforce_client_clipping(server_round, results, used_norm)
        if enforced is None:
            return None, {}
        checked_results, reclipped = enforced
        parameters, metrics = self.strategy.aggregate_fit(server_round, checked_results, [])
        clipped_count = sum(
            int(bool(r.metrics[KEY_NORM_BIT]) or again)
            for (_, r), again in zip(results, reclipped, strict=True)
        )
        self.adapt(server_round, clipped_count, len(results))
        if parameters is not None:
            parameters = self.add_noise(parameters, used_norm)
        return parameters, metrics
