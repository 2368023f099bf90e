"""Classic instructions and replies <-> :class:`~stamen.records.RecordSet` (Flower's layout).

The record names and keys are Flower 1.12's, so a client mod written for Flower finds
what it looks for. For a prefix ``p`` (``fitins``, ``fitres``, ``evaluateins``,
``evaluateres``, ``getparametersins``, ``getparametersres``, ``getpropertiesins``,
``getpropertiesres``):

=========================  ===================  ====================================
field                      record               content
=========================  ===================  ====================================
``parameters``             parameters ``p.parameters``  one :class:`Array` per tensor,
                                                named ``"0"``, ``"1"``, ...: ``dtype=""``,
                                                ``shape=[]``, ``stype=tensor_type``,
                                                ``data`` the tensor; no tensor:
                                                ``"_empty"`` keeps the tensor type
``config``                 configs ``p.config``   the config
``metrics``                configs ``p.metrics``  the metrics
``properties``             configs ``p.properties``  the properties
``status``                 configs ``p.status``   ``{"code": int, "message": str}``
``num_examples``           metrics ``p.num_examples``  ``{"num_examples": int}``
``loss``                   metrics ``p.loss``     ``{"loss": float}``
=========================  ===================  ====================================

Only client mods use these conversions: without mods a client node never builds a
RecordSet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from .messages import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Status,
)
from .records import Array, ConfigsRecord, MetricsRecord, ParametersRecord, RecordSet
from .typing import Scalar

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

EMPTY_TENSOR_KEY = "_empty"
"""Name of the placeholder Array that keeps the tensor type of parameters with no tensor."""


def parameters_to_parametersrecord(parameters: Parameters, keep_input: bool) -> ParametersRecord:
    """``Parameters`` as a :class:`ParametersRecord` (tensors named ``"0"``, ``"1"``, ...).

    ``keep_input`` is accepted for Flower's signature; ``Parameters`` are immutable here,
    so the input is always kept.
    """
    del keep_input
    record = ParametersRecord()
    if not parameters.tensors:
        record[EMPTY_TENSOR_KEY] = Array("", [], parameters.tensor_type, b"")
        return record
    for index, tensor in enumerate(parameters.tensors):
        data = tensor if isinstance(tensor, bytes) else bytes(tensor)
        record[str(index)] = Array("", [], parameters.tensor_type, data)
    return record


def parametersrecord_to_parameters(record: ParametersRecord, keep_input: bool) -> Parameters:
    """A :class:`ParametersRecord` as ``Parameters``, tensors in the record's order.

    The tensor type is the arrays' ``stype`` (``""`` for an empty record). With
    ``keep_input=False`` the record is emptied.

    Raises:
        TypeError: the arrays do not share one ``stype``.
    """
    stypes = {array.stype for array in record.values()}
    if len(stypes) > 1:
        raise TypeError(
            f"ParametersRecord: expected arrays of one stype, received {sorted(stypes)}"
        )
    tensor_type = stypes.pop() if stypes else ""
    tensors: list[bytes | memoryview] = [
        array.data for key, array in record.items() if key != EMPTY_TENSOR_KEY
    ]
    if not keep_input:
        record.clear()
    return Parameters(tensors=tensors, tensor_type=tensor_type)


def _record(recordset: RecordSet, kind: str, name: str) -> Any:
    records: Mapping[str, Any] = getattr(recordset, f"{kind}_records")
    try:
        return records[name]
    except KeyError:
        raise KeyError(
            f"RecordSet: expected {kind}_records[{name!r}], received records {sorted(records)}"
        ) from None


def _config(recordset: RecordSet, name: str) -> dict[str, Scalar]:
    return cast(dict[str, Scalar], dict(_record(recordset, "configs", name)))


def _status(recordset: RecordSet, prefix: str) -> Status:
    record = _record(recordset, "configs", f"{prefix}.status")
    return Status(code=Code(int(record["code"])), message=str(record["message"]))


def _put_status(recordset: RecordSet, prefix: str, status: Status) -> None:
    recordset.configs_records[f"{prefix}.status"] = ConfigsRecord(
        {"code": int(status.code), "message": status.message}
    )


def _put_parameters(recordset: RecordSet, name: str, parameters: Parameters) -> None:
    recordset.parameters_records[name] = parameters_to_parametersrecord(parameters, True)


def _parameters(recordset: RecordSet, name: str, keep_input: bool) -> Parameters:
    record: ParametersRecord = _record(recordset, "parameters", name)
    return parametersrecord_to_parameters(record, keep_input)


def _ins_to_recordset(
    prefix: str, parameters: Parameters | None, config: Mapping[str, Scalar]
) -> RecordSet:
    recordset = RecordSet()
    if parameters is not None:
        _put_parameters(recordset, f"{prefix}.parameters", parameters)
    recordset.configs_records[f"{prefix}.config"] = ConfigsRecord(dict(config))
    return recordset


def fitins_to_recordset(fitins: FitIns, keep_input: bool) -> RecordSet:
    """``FitIns`` as records ``fitins.parameters`` and ``fitins.config``."""
    del keep_input
    return _ins_to_recordset("fitins", fitins.parameters, fitins.config)


def recordset_to_fitins(recordset: RecordSet, keep_input: bool) -> FitIns:
    """Records ``fitins.parameters`` and ``fitins.config`` as ``FitIns``."""
    return FitIns(
        parameters=_parameters(recordset, "fitins.parameters", keep_input),
        config=_config(recordset, "fitins.config"),
    )


def evaluateins_to_recordset(evaluateins: EvaluateIns, keep_input: bool) -> RecordSet:
    """``EvaluateIns`` as records ``evaluateins.parameters`` and ``evaluateins.config``."""
    del keep_input
    return _ins_to_recordset("evaluateins", evaluateins.parameters, evaluateins.config)


def recordset_to_evaluateins(recordset: RecordSet, keep_input: bool) -> EvaluateIns:
    """Records ``evaluateins.parameters`` and ``evaluateins.config`` as ``EvaluateIns``."""
    return EvaluateIns(
        parameters=_parameters(recordset, "evaluateins.parameters", keep_input),
        config=_config(recordset, "evaluateins.config"),
    )


def getparametersins_to_recordset(getparametersins: GetParametersIns) -> RecordSet:
    """``GetParametersIns`` as the record ``getparametersins.config``."""
    return _ins_to_recordset("getparametersins", None, getparametersins.config)


def recordset_to_getparametersins(recordset: RecordSet) -> GetParametersIns:
    """The record ``getparametersins.config`` as ``GetParametersIns``."""
    return GetParametersIns(config=_config(recordset, "getparametersins.config"))


def getpropertiesins_to_recordset(getpropertiesins: GetPropertiesIns) -> RecordSet:
    """``GetPropertiesIns`` as the record ``getpropertiesins.config``."""
    return _ins_to_recordset("getpropertiesins", None, getpropertiesins.config)


def recordset_to_getpropertiesins(recordset: RecordSet) -> GetPropertiesIns:
    """The record ``getpropertiesins.config`` as ``GetPropertiesIns``."""
    return GetPropertiesIns(config=_config(recordset, "getpropertiesins.config"))


def fitres_to_recordset(fitres: FitRes, keep_input: bool) -> RecordSet:
    """``FitRes`` as records ``fitres.parameters``, ``fitres.num_examples``,
    ``fitres.metrics`` and ``fitres.status``."""
    del keep_input
    recordset = RecordSet()
    _put_parameters(recordset, "fitres.parameters", fitres.parameters)
    recordset.metrics_records["fitres.num_examples"] = MetricsRecord(
        {"num_examples": fitres.num_examples}
    )
    recordset.configs_records["fitres.metrics"] = ConfigsRecord(dict(fitres.metrics))
    _put_status(recordset, "fitres", fitres.status)
    return recordset


def recordset_to_fitres(recordset: RecordSet, keep_input: bool) -> FitRes:
    """The ``fitres.*`` records as ``FitRes``."""
    return FitRes(
        status=_status(recordset, "fitres"),
        parameters=_parameters(recordset, "fitres.parameters", keep_input),
        num_examples=int(_record(recordset, "metrics", "fitres.num_examples")["num_examples"]),
        metrics=_config(recordset, "fitres.metrics"),
    )


def evaluateres_to_recordset(evaluateres: EvaluateRes) -> RecordSet:
    """``EvaluateRes`` as records ``evaluateres.loss``, ``evaluateres.num_examples``,
    ``evaluateres.metrics`` and ``evaluateres.status``."""
    recordset = RecordSet()
    recordset.metrics_records["evaluateres.loss"] = MetricsRecord({"loss": evaluateres.loss})
    recordset.metrics_records["evaluateres.num_examples"] = MetricsRecord(
        {"num_examples": evaluateres.num_examples}
    )
    recordset.configs_records["evaluateres.metrics"] = ConfigsRecord(dict(evaluateres.metrics))
    _put_status(recordset, "evaluateres", evaluateres.status)
    return recordset


def recordset_to_evaluateres(recordset: RecordSet) -> EvaluateRes:
    """The ``evaluateres.*`` records as ``EvaluateRes``."""
    return EvaluateRes(
        status=_status(recordset, "evaluateres"),
        loss=float(_record(recordset, "metrics", "evaluateres.loss")["loss"]),
        num_examples=int(_record(recordset, "metrics", "evaluateres.num_examples")["num_examples"]),
        metrics=_config(recordset, "evaluateres.metrics"),
    )


def getparametersres_to_recordset(
    getparametersres: GetParametersRes, keep_input: bool
) -> RecordSet:
    """``GetParametersRes`` as records ``getparametersres.parameters`` and ``.status``."""
    del keep_input
    recordset = RecordSet()
    _put_parameters(recordset, "getparametersres.parameters", getparametersres.parameters)
    _put_status(recordset, "getparametersres", getparametersres.status)
    return recordset


def recordset_to_getparametersres(recordset: RecordSet, keep_input: bool) -> GetParametersRes:
    """The ``getparametersres.*`` records as ``GetParametersRes``."""
    return GetParametersRes(
        status=_status(recordset, "getparametersres"),
        parameters=_parameters(recordset, "getparametersres.parameters", keep_input),
    )


def getpropertiesres_to_recordset(getpropertiesres: GetPropertiesRes) -> RecordSet:
    """``GetPropertiesRes`` as records ``getpropertiesres.properties`` and ``.status``."""
    recordset = RecordSet()
    recordset.configs_records["getpropertiesres.properties"] = ConfigsRecord(
        dict(getpropertiesres.properties)
    )
    _put_status(recordset, "getpropertiesres", getpropertiesres.status)
    return recordset


def recordset_to_getpropertiesres(recordset: RecordSet) -> GetPropertiesRes:
    """The ``getpropertiesres.*`` records as ``GetPropertiesRes``."""
    return GetPropertiesRes(
        status=_status(recordset, "getpropertiesres"),
        properties=_config(recordset, "getpropertiesres.properties"),
    )
