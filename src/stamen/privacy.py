"""Central differential privacy: clipping and noise (pure NumPy).

The math shared by the server-side strategy wrappers
(:mod:`stamen.server.strategy.dp_fixed_clipping`,
:mod:`stamen.server.strategy.dp_adaptive_clipping`) and the client-side wrappers of
:mod:`stamen.client.dp`, so neither side imports the other:

* FlatClip (McMahan et al. 2018): an update ``u`` is scaled by
  ``min(1, C / ||u||_2)``, the norm taken over all its arrays at once;
* Gaussian noise of standard deviation ``sigma * C / m`` added to the mean of ``m``
  clipped updates (``sigma``: noise multiplier);
* adaptive clipping (Andrew et al. 2021): the clipping norm follows a target quantile of
  the update norms, from the (noised) fraction of clipped updates.

The fit-config and fit-metrics keys are Flower 1.12's, so Flower and Stamen peers mix:
``"clipping_norm"`` (server to client) and ``"norm_bit"`` (client to server, True if the
client's update was clipped).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from ._dtypes import cast_like
from .errors import ConfigError
from .typing import NDArrays

__all__ = [
    "KEY_CLIPPING_NORM",
    "KEY_NORM_BIT",
    "adaptive_clipping_norm",
    "add_gaussian_noise",
    "clip_update",
    "compute_adaptive_noise_params",
    "compute_clip_model_update",
    "compute_stdv",
    "get_norm",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger("stamen.server")

KEY_CLIPPING_NORM = "clipping_norm"
"""Fit-config key of the clipping norm the server sends (Flower's)."""

KEY_NORM_BIT = "norm_bit"
"""Fit-metrics key of the bit a client returns: True if its update was clipped (Flower's)."""


def get_norm(arrays: NDArrays) -> float:
    """The L2 norm of all the arrays' entries taken together, in float64."""
    total = 0.0
    for array in arrays:
        magnitude = np.abs(array).astype(np.float64, copy=False)
        total += float(np.sum(magnitude * magnitude))
    return math.sqrt(total)


def clip_update(update: NDArrays, clipping_norm: float) -> tuple[NDArrays, bool]:
    """FlatClip: ``u * min(1, C / ||u||)``, in float64; and whether it was scaled down.

    A zero update is returned unchanged (not clipped).
    """
    norm = get_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    scaled = [np.multiply(u, scale, dtype=np.result_type(u.dtype, np.float64)) for u in update]
    return scaled, scale < 1.0


def compute_clip_model_update(
    model: NDArrays, reference: NDArrays, clipping_norm: float
) -> tuple[NDArrays, bool]:
    """Clip the update ``model - reference`` to ``clipping_norm``; return the clipped model.

    Returns:
        ``(reference + clip(model - reference), norm_bit)``, each layer in ``model``'s
        dtype; ``norm_bit`` is True if the update was scaled down.
    """
    update = [
        np.subtract(m, r, dtype=np.result_type(m.dtype, r.dtype, np.float64))
        for m, r in zip(model, reference, strict=True)
    ]
    clipped, norm_bit = clip_update(update, clipping_norm)
    return [
        cast_like(np.add(r, u, dtype=u.dtype), m.dtype)
        for m, r, u in zip(model, reference, clipped, strict=True)
    ], norm_bit


def compute_stdv(noise_multiplier: float, clipping_norm: float, num_sampled_clients: int) -> float:
    """Standard deviation of the noise on the mean of clipped updates: ``sigma * C / m``."""
    return float(noise_multiplier * clipping_norm / num_sampled_clients)


def add_gaussian_noise(arrays: NDArrays, std: float, rng: np.random.Generator) -> NDArrays:
    """``arrays`` plus i.i.d. ``N(0, std^2)`` noise, each layer in its dtype."""
    if std == 0:
        return [a.copy() for a in arrays]
    return [
        cast_like(
            np.asarray(a, dtype=np.result_type(a.dtype, np.float64))
            + rng.normal(0.0, std, a.shape),
            a.dtype,
        )
        for a in arrays
    ]


def compute_adaptive_noise_params(
    noise_multiplier: float, num_sampled_clients: float, clipped_count_stddev: float | None
) -> tuple[float, float]:
    """Split the privacy budget between the model noise and the clipped-count noise.

    Andrew et al. (2021): with ``sigma_b = clipped_count_stddev`` (default ``m / 20``),
    the model's noise multiplier becomes ``(sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` so that both
    together spend the budget of ``sigma``. With ``sigma = 0`` there is no noise at all.

    Returns:
        ``(clipped_count_stddev, noise_multiplier for the model)``.

    Raises:
        ConfigError: ``sigma >= 2 sigma_b``: the count noise alone exceeds the budget.
    """
    if noise_multiplier <= 0:
        return (0.0 if clipped_count_stddev is None else clipped_count_stddev), 0.0
    stddev = num_sampled_clients / 20 if clipped_count_stddev is None else clipped_count_stddev
    if noise_multiplier >= 2 * stddev:
        raise ConfigError(
            f"clipped_count_stddev: {stddev} (default num_sampled_clients / 20) is too low for "
            f"noise_multiplier={noise_multiplier}: it must exceed noise_multiplier / 2. "
            "Increase clipped_count_stddev or decrease noise_multiplier."
        )
    effective = (noise_multiplier ** (-2) - (2 * stddev) ** (-2)) ** -0.5
    if effective / noise_multiplier >= 2:
        logger.warning(
            "adaptive clipping: the model noise multiplier grows %.3g-fold to pay for the "
            "clipped-count noise; consider a larger clipped_count_stddev or more clients",
            effective / noise_multiplier,
        )
    return stddev, effective


def adaptive_clipping_norm(
    clipping_norm: float,
    clipped_fraction: float,
    target_clipped_quantile: float,
    clip_norm_lr: float,
    *,
    flower_compatible_update: bool,
) -> float:
    """The next clipping norm, from the (noised) fraction of clipped updates.

    ``flower_compatible_update=True``: Flower 1.12's rule
    ``C * exp(-lr * (clipped_fraction - target))``, which *lowers* the norm when more
    updates than the target were clipped. ``False``: the rule of Andrew et al. (2021)
    written for the clipped fraction, ``C * exp(lr * (clipped_fraction - target))``,
    which moves the norm toward the target quantile of the update norms.
    """
    sign = -1.0 if flower_compatible_update else 1.0
    return clipping_norm * math.exp(
        sign * clip_norm_lr * (clipped_fraction - target_clipped_quantile)
    )


def rng_state(rng: np.random.Generator) -> str:
    """The state of ``rng`` as a JSON string (exact; the bit generator's own format)."""
    return json.dumps(rng.bit_generator.state, sort_keys=True)


def set_rng_state(rng: np.random.Generator, state: str) -> None:
    """Restore a state written by :func:`rng_state`.

    Raises:
        ConfigError: the state is not one of ``rng``'s bit generator.
    """
    try:
        rng.bit_generator.state = json.loads(state)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"rng state: cannot restore {state!r:.80}: {exc}") from exc
