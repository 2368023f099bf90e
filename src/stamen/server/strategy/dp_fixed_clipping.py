"""Central differential privacy with a fixed clipping norm, clipped on server or clients."""

from __future__ import annotations

import logging
from dataclasses import replace

from ...messages import FitIns, Parameters
from ...privacy import KEY_CLIPPING_NORM, compute_clip_model_update
from ...typing import Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from ._checks import check_number
from ._dp_base import DPWrapperBase, clipped_parameters
from .fedprox import with_config
from .state import StrategyState
from .strategy import FitFailures, FitResults, Strategy

__all__ = [
    "DifferentialPrivacyClientSideFixedClipping",
    "DifferentialPrivacyServerSideFixedClipping",
]

logger = logging.getLogger("stamen.server")


class DifferentialPrivacyServerSideFixedClipping(DPWrapperBase):
    """Central DP: the server clips each update to a fixed norm, then noises the aggregate.

    With the global model ``w_t``, each client model ``w_k`` is replaced by
    ``w_t + u_k * min(1, C / ||u_k||_2)`` where ``u_k = w_k - w_t`` (FlatClip, the norm over
    all arrays); the wrapped strategy aggregates the clipped models, and Gaussian noise
    ``N(0, (sigma * C / m)^2)`` is added to every parameter of the aggregate, with
    ``sigma = noise_multiplier``, ``C = clipping_norm``, ``m = num_sampled_clients``.

    Papers: McMahan et al., "Learning Differentially Private Recurrent Language Models",
    ICLR 2018 (arXiv:1710.06963); Geyer et al., "Differentially Private Federated
    Learning: A Client Level Perspective", 2017 (arXiv:1712.07557).

    A round with any failure (or refused result) is not aggregated. Memory: the clipped
    results are re-encoded, so the round holds a second copy of every result (as Flower).

    Arguments are Flower 1.12's (positional as there). Beyond Flower: the keyword ``seed``
    seeds the noise generator. State: the wrapped strategy's, and the generator's only if
    seeded (noise a checkpoint could replay protects nothing).

    Args:
        strategy: The strategy that aggregates the clipped results.
        noise_multiplier: ``sigma >= 0`` (1 or more for strong privacy).
        clipping_norm: ``C > 0``.
        num_sampled_clients: ``m``, the number of clients sampled each round.
        seed: Seed of the noise generator (None: OS entropy, never saved).
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, seed)
        check_number("clipping_norm", clipping_norm, minimum=0.0, exclusive_minimum=True)
        self.clipping_norm = clipping_norm

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Server-Side Fixed Clipping)"

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Clip each update, aggregate with the wrapped strategy, add noise."""
        if self.round_refused(server_round, results, failures):
            return None, {}
        valid = self.valid_results(server_round, results)
        if valid is None:
            return None, {}
        clipped_results: FitResults = []
        for proxy, fit_res, arrays in valid:
            clipped, _ = compute_clip_model_update(
                arrays, self.current_round_params, self.clipping_norm
            )
            clipped_results.append(
                (proxy, replace(fit_res, parameters=clipped_parameters(fit_res, arrays, clipped)))
            )
        logger.info("round %s: updates clipped to norm %.6g", server_round, self.clipping_norm)
        parameters, metrics = self.strategy.aggregate_fit(server_round, clipped_results, [])
        if parameters is not None:
            parameters = self.add_noise(parameters, self.clipping_norm)
        return parameters, metrics

    def state_dict(self) -> StrategyState:
        """The wrapped strategy's state, and the seeded RNG's."""
        return self.wrapper_state()

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.load_wrapper_state(state, set())


class DifferentialPrivacyClientSideFixedClipping(DPWrapperBase):
    """Central DP: the clients clip their updates to a fixed norm; the server adds noise.

    Each fit config carries ``"clipping_norm": C``; each client clips its update to it
    (a Stamen NumPyClient with :class:`stamen.client.dp.FixedClippingNumPyClient`, a
    Flower client with ``fixedclipping_mod``). The wrapped strategy aggregates, and noise
    ``N(0, (sigma * C / m)^2)`` is added to every parameter of the aggregate.

    Papers: McMahan et al., ICLR 2018 (arXiv:1710.06963); Geyer et al., 2017
    (arXiv:1712.07557).

    A round with any failure (or refused result) is not aggregated. Beyond Flower: the
    server checks the clipping (when it knows the global model) and clips again an update
    whose norm exceeds ``C``, with a warning, so one client that does not clip cannot break
    the guarantee.

    Arguments are Flower 1.12's (positional as there), plus the keyword ``seed`` (see
    :class:`DifferentialPrivacyServerSideFixedClipping`).

    Args:
        strategy: The strategy that aggregates the clipped results.
        noise_multiplier: ``sigma >= 0``.
        clipping_norm: ``C > 0``.
        num_sampled_clients: ``m``, the number of clients sampled each round.
        seed: Seed of the noise generator (None: OS entropy, never saved).
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, seed)
        check_number("clipping_norm", clipping_norm, minimum=0.0, exclusive_minimum=True)
        self.clipping_norm = clipping_norm

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Client-Side Fixed Clipping)"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's instructions, with ``"clipping_norm"`` in each config."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        return with_config(instructions, {KEY_CLIPPING_NORM: float(self.clipping_norm)})

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the clipping, aggregate with the wrapped strategy, add noise."""
        if self.round_refused(server_round, results, failures):
            return None, {}
        enforced = self.enforce_client_clipping(server_round, results, self.clipping_norm)
        if enforced is None:
            return None, {}
        parameters, metrics = self.strategy.aggregate_fit(server_round, enforced[0], [])
        if parameters is not None:
            parameters = self.add_noise(parameters, self.clipping_norm)
        return parameters, metrics

    def state_dict(self) -> StrategyState:
        """The wrapped strategy's state, and the seeded RNG's."""
        return self.wrapper_state()

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.load_wrapper_state(state, set())
