"""Flower-compatible facade (``flwr.common``): re-exports only.

Submodules mirror Flower's: :mod:`stamen.common.logger` (``log``, ``configure``),
:mod:`stamen.common.recordset_compat`, :mod:`stamen.common.typing`.
"""

from __future__ import annotations

from ..context import Context
from ..logger import configure, log
from ..message import (
    DEFAULT_TTL,
    Error,
    Message,
    MessageType,
    MessageTypeLegacy,
    Metadata,
    now,
)
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
from ..ndarrays import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from ..net.limits import GRPC_MAX_MESSAGE_LENGTH
from ..records import (
    Array,
    ConfigsRecord,
    ConfigsRecordValues,
    MetricsRecord,
    MetricsRecordValues,
    ParametersRecord,
    RecordSet,
    array_from_numpy,
)
from ..typing import Config, Metrics, MetricsAggregationFn, NDArray, NDArrays, Properties, Scalar
from . import logger as logger
from . import recordset_compat as recordset_compat
from . import typing as typing

__all__ = [
    "DEFAULT_TTL",
    "GRPC_MAX_MESSAGE_LENGTH",
    "Array",
    "Code",
    "Config",
    "ConfigsRecord",
    "ConfigsRecordValues",
    "Context",
    "DisconnectRes",
    "Error",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "GetParametersIns",
    "GetParametersRes",
    "GetPropertiesIns",
    "GetPropertiesRes",
    "Message",
    "MessageType",
    "MessageTypeLegacy",
    "Metadata",
    "Metrics",
    "MetricsAggregationFn",
    "MetricsRecord",
    "MetricsRecordValues",
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
    "array_from_numpy",
    "bytes_to_ndarray",
    "configure",
    "log",
    "ndarray_to_bytes",
    "ndarrays_to_parameters",
    "now",
    "parameters_to_ndarrays",
]
