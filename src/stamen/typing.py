"""Type aliases shared by the whole package (the names Flower users know)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import numpy.typing as npt

__all__ = [
    "Config",
    "Metrics",
    "MetricsAggregationFn",
    "NDArray",
    "NDArrays",
    "Properties",
    "Scalar",
    "UserConfig",
    "UserConfigValue",
]

NDArray: TypeAlias = npt.NDArray[Any]
NDArrays: TypeAlias = list[npt.NDArray[Any]]

Scalar: TypeAlias = bool | bytes | float | int | str
"""A value allowed in configs, metrics and properties."""

Config: TypeAlias = dict[str, Scalar]
Metrics: TypeAlias = dict[str, Scalar]
Properties: TypeAlias = dict[str, Scalar]

UserConfigValue: TypeAlias = bool | float | int | str
UserConfig: TypeAlias = dict[str, UserConfigValue]


MetricsAggregationFn: TypeAlias = Callable[[list[tuple[int, Metrics]]], Metrics]
