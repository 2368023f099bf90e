"""Flower-compatible facade (``flwr.common``): re-exports only."""

from __future__ import annotations

from .context import ConfigsRecord, Context, MetricsRecord, ParametersRecord, RecordSet
from .messages import (
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
from .ndarrays import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from .typing import Config, Metrics, MetricsAggregationFn, NDArray, NDArrays, Properties, Scalar

__all__ = [
    "Code",
    "Config",
    "ConfigsRecord",
    "Context",
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
    "MetricsRecord",
    "NDArray",
    "NDArrays",
    "Parameters",
    "ParametersRecord",
    "Properties",
    "Reason",
    "ReconnectIns",
    "RecordSet",
    "Scalar",
    "Status",
    "bytes_to_ndarray",
    "ndarray_to_bytes",
    "ndarrays_to_parameters",
    "parameters_to_ndarrays",
]
