"""Flower's ``flwr.common.recordset_compat`` (see :mod:`stamen.recordset_compat`)."""

from __future__ import annotations

from ..recordset_compat import (
    EMPTY_TENSOR_KEY,
    evaluateins_to_recordset,
    evaluateres_to_recordset,
    fitins_to_recordset,
    fitres_to_recordset,
    getparametersins_to_recordset,
    getparametersres_to_recordset,
    getpropertiesins_to_recordset,
    getpropertiesres_to_recordset,
    parameters_to_parametersrecord,
    parametersrecord_to_parameters,
    recordset_to_evaluateins,
    recordset_to_evaluateres,
    recordset_to_fitins,
    recordset_to_fitres,
    recordset_to_getparametersins,
    recordset_to_getparametersres,
    recordset_to_getpropertiesins,
    recordset_to_getpropertiesres,
)

__all__ = [
    "EMPTY_TENSOR_KEY",
    "evaluateins_to_recordset",
    "evaluateres_to_recordset",
    "fitins_to_recordset",
    "fitres_to_recordset",
    "getparametersins_to_recordset",
    "getparametersres_to_recordset",
    "getpropertiesins_to_recordset",
    "getpropertiesres_to_recordset",
    "parameters_to_parametersrecord",
    "parametersrecord_to_parameters",
    "recordset_to_evaluateins",
    "recordset_to_evaluateres",
    "recordset_to_fitins",
    "recordset_to_fitres",
    "recordset_to_getparametersins",
    "recordset_to_getparametersres",
    "recordset_to_getpropertiesins",
    "recordset_to_getpropertiesres",
]
