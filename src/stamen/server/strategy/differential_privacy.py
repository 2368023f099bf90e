"""Central differential privacy math, where the strategies first had it.

The implementation is :mod:`stamen.privacy` (shared with the client-side wrappers of
:mod:`stamen.client.dp`); these names stay importable from here.
"""

from __future__ import annotations

from ...privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    adaptive_clipping_norm,
    add_gaussian_noise,
    clip_update,
    compute_adaptive_noise_params,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
    rng_state,
    set_rng_state,
)

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
