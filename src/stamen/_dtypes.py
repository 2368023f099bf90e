"""Casting float64 results back to a layer's dtype (shared by aggregation and privacy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .typing import NDArray

__all__ = ["cast_like"]


def cast_like(array: NDArray, dtype: np.dtype[Any]) -> NDArray:
    """Cast a float64 result back to a layer's ``dtype``, rounding for ints and bools."""
    if array.dtype == dtype:
        return array
    if np.issubdtype(dtype, np.inexact):
        return array.astype(dtype)
    return np.rint(array).astype(dtype)
