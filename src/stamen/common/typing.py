"""Flower's ``flwr.common.typing``: the type aliases and message types, by Flower's names."""

from __future__ import annotations

from ..messages import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Reason,
    ReconnectIns,
    Status,
)
from ..typing import (
    Config,
    Metrics,
    MetricsAggregationFn,
    NDArray,
    NDArrays,
    Properties,
    Scalar,
    UserConfig,
    UserConfigValue,
)

__all__ = [
    "Code",
    "Config",
    "DisconnectRes",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "GetParametersIns",
    "GetParametersRes",
    "GetPropertiesIns",
    "GetPropertiesRes",
    "Metrics",
    "MetricsAggregationFn",
    "NDArray",
    "NDArrays",
    "Parameters",
    "Properties",
    "Reason",
    "ReconnectIns",
    "Scalar",
    "Status",
    "UserConfig",
    "UserConfigValue",
]
