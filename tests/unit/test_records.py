"""Records, Message and the legacy record layout behave as Flower 1.12's (observed facts)."""

from __future__ import annotations

import collections
import copy
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.common import (
    DEFAULT_TTL,
    Array,
    ConfigsRecord,
    Error,
    Message,
    MessageType,
    MessageTypeLegacy,
    Metadata,
    MetricsRecord,
    ParametersRecord,
    RecordSet,
    array_from_numpy,
)
from stamen.common import recordset_compat as compat
from stamen.messages import (
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
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays


@pytest.mark.parametrize(
    "value",
    [1, 2.0, [1, 2], [1.0], [], np.float64(1.5), [1, True]],
    ids=repr,
)
def test_metrics_record_accepts_numbers_and_lists_of_one_kind(value: Any) -> None:
    """int, float (np.float64 is one), lists of them; ``[1, True]`` passes as in Flower."""
    assert MetricsRecord({"a": value})["a"] == value


@pytest.mark.parametrize(
    "value",
    [True, "s", b"b", None, (1, 2), np.float32(1), np.int64(1), [1, 2.0], [True], {"x": 1}],
    ids=repr,
)
def test_metrics_record_rejects_other_values_with_type_error(value: Any) -> None:
    """bool, str, NumPy scalars but float64, tuples, mixed lists: TypeError naming both."""
    with pytest.raises(TypeError, match="MetricsRecord: expected"):
        MetricsRecord({"a": value})
    record = MetricsRecord()
    with pytest.raises(TypeError, match="received"):
        record["a"] = value
    assert "a" not in record


@pytest.mark.parametrize(
    "value",
    [1, 1.5, "x", b"y", True, [True], ["a"], [b"a"], [1.0], [1, 2], []],
    ids=repr,
)
def test_configs_record_accepts_scalars_and_lists_of_one_kind(value: Any) -> None:
    """int, float, str, bytes, bool, and lists of one of them."""
    assert ConfigsRecord({"a": value})["a"] == value


@pytest.mark.parametrize(
    "value", [None, {"x": 1}, (1,), [1, "x"], [True, 1], np.float32(2)], ids=repr
)
def test_configs_record_rejects_other_values(value: Any) -> None:
    """None, dicts, tuples, mixed lists, NumPy float32: TypeError."""
    with pytest.raises(TypeError, match="ConfigsRecord: expected"):
        ConfigsRecord({"a": value})


def test_keys_must_be_str() -> None:
    """A non-str key is a TypeError naming the type received."""
    with pytest.raises(TypeError, match="expected str keys, received int"):
        MetricsRecord({1: 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="expected str keys"):
        ConfigsRecord()[2] = "x"  # type: ignore[index]


def test_count_bytes_as_flower_counts() -> None:
    """Numbers 8 bytes, bools 1, str/bytes their length, lists per element, plus keys;
    arrays their data plus the key (values observed with Flower 1.12)."""
    assert MetricsRecord({"a": 1, "b": [1.0, 2.0]}).count_bytes() == 26
    assert MetricsRecord({"abcd": 1}).count_bytes() == 12
    assert MetricsRecord({"a": []}).count_bytes() == 1
    configs = ConfigsRecord({"a": "xyz", "b": b"12", "c": True, "d": [1, 2], "e": ["ab", "c"]})
    assert configs.count_bytes() == 30
    assert ConfigsRecord({"a": [True, False]}).count_bytes() == 3
    array = array_from_numpy(np.zeros(3))
    assert ParametersRecord({"abcd": array}).count_bytes() == len(array.data) + 4


def test_keep_input_defaults() -> None:
    """ParametersRecord empties its input by default; Metrics/ConfigsRecord copy it."""
    arrays = collections.OrderedDict(w=array_from_numpy(np.ones(2)))
    record = ParametersRecord(arrays)
    assert list(record) == ["w"]
    assert arrays == {}
    metrics = {"a": 1}
    MetricsRecord(metrics)
    assert metrics == {"a": 1}
    MetricsRecord(metrics, keep_input=False)
    assert metrics == {}
    kept = collections.OrderedDict(w=array_from_numpy(np.ones(2)))
    ParametersRecord(kept, keep_input=True)
    assert list(kept) == ["w"]


def test_records_are_mappings_equal_to_dicts_but_not_dicts() -> None:
    """Mapping behaviour, equality with a dict, and a dict-like repr."""
    record = MetricsRecord({"a": 1})
    assert record == {"a": 1}
    assert record == MetricsRecord({"a": 1})
    assert not isinstance(record, dict)
    assert repr(record) == "{'a': 1}"
    assert record.setdefault("b", 2.0) == 2.0
    assert dict(record.items()) == {"a": 1, "b": 2.0}
    with pytest.raises(TypeError):
        record.update({"c": "bad"})


def test_array_from_numpy_and_back() -> None:
    """array_from_numpy keeps dtype and shape; .numpy() decodes the .npy bytes."""
    original = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = array_from_numpy(original)
    assert (array.dtype, array.shape, array.stype) == ("float32", [2, 3], "numpy.ndarray")
    np.testing.assert_array_equal(array.numpy(), original)
    assert array.numpy().dtype == np.float32
    with pytest.raises(TypeError, match=r"expected stype 'numpy\.ndarray', received 'other'"):
        Array(dtype="float32", shape=[3], stype="other", data=b"").numpy()
    with pytest.raises(TypeError, match="expected a NumPy ndarray, received list"):
        array_from_numpy([1, 2])  # type: ignore[arg-type]


def test_parameters_record_holds_only_arrays() -> None:
    """A raw ndarray is a TypeError pointing at array_from_numpy."""
    with pytest.raises(TypeError, match=r"expected an Array .*received ndarray"):
        ParametersRecord({"x": np.zeros(3)})  # type: ignore[dict-item]


def test_recordset_checks_record_types() -> None:
    """Each of the three mappings takes only its own record type."""
    records = RecordSet()
    with pytest.raises(TypeError, match="expected a ParametersRecord here, received dict"):
        records.parameters_records["x"] = {"a": 1}  # type: ignore[assignment]
    with pytest.raises(TypeError, match="expected a MetricsRecord here, received ConfigsRecord"):
        records.metrics_records["x"] = ConfigsRecord({"a": 1})  # type: ignore[assignment]
    records.metrics_records["m"] = MetricsRecord({"a": 1})
    assert records == RecordSet(metrics_records={"m": MetricsRecord({"a": 1})})
    assert repr(records) == (
        "RecordSet(parameters_records={}, metrics_records={'m': {'a': 1}}, configs_records={})"
    )


def test_state_survives_copying_for_process_backends() -> None:
    """Backends in other processes (Ray) ship state back: records survive the copy
    protocol (``__getstate__``/``__setstate__``) with their type checks."""
    state = RecordSet()
    state.metrics_records["m"] = MetricsRecord({"n": 3})
    state.parameters_records["p"] = ParametersRecord({"w": array_from_numpy(np.ones(2))})
    copied = copy.deepcopy(state)
    assert copied == state
    with pytest.raises(TypeError):
        copied.metrics_records["x"] = ConfigsRecord()  # type: ignore[assignment]


def test_context_state_is_a_recordset_from_every_import_path() -> None:
    """stamen.context, stamen.common and stamen.records name the same classes."""
    from stamen import context as context_module
    from stamen import records

    assert context_module.RecordSet is fl.common.RecordSet is records.RecordSet
    assert context_module.MetricsRecord is fl.common.MetricsRecord


def _metadata(**overrides: Any) -> Metadata:
    fields: dict[str, Any] = {
        "run_id": 1,
        "message_id": "m1",
        "src_node_id": 0,
        "dst_node_id": 5,
        "reply_to_message": "",
        "group_id": "g",
        "ttl": DEFAULT_TTL,
        "message_type": MessageType.TRAIN,
    }
    fields.update(overrides)
    return Metadata(**fields)


def test_message_needs_exactly_one_of_content_and_error() -> None:
    """Neither or both: ValueError; content of an error message: ValueError."""
    with pytest.raises(ValueError, match="exactly one"):
        Message(metadata=_metadata())
    with pytest.raises(ValueError, match="both"):
        Message(metadata=_metadata(), content=RecordSet(), error=Error(1))
    failed = Message(metadata=_metadata(), error=Error(code=2, reason="x"))
    assert failed.has_error() and not failed.has_content()
    with pytest.raises(ValueError, match="has_content"):
        failed.content  # noqa: B018


def test_reply_swaps_nodes_and_keeps_run_group_and_type() -> None:
    """create_reply: src/dst swapped, reply_to_message set, ttl what is left (<= ttl)."""
    message = Message(metadata=_metadata(), content=RecordSet())
    reply = message.create_reply(RecordSet())
    meta = reply.metadata
    assert (meta.run_id, meta.src_node_id, meta.dst_node_id) == (1, 5, 0)
    assert (meta.reply_to_message, meta.message_id, meta.group_id) == ("m1", "", "g")
    assert meta.message_type == "train"
    assert 0 < meta.ttl <= DEFAULT_TTL
    error = message.create_error_reply(Error(code=0, reason="r"), ttl=10)
    assert error.error == Error(0, "r")
    assert error.metadata.ttl == 10


def test_metadata_read_only_and_settable_fields() -> None:
    """run_id, message_id, src_node_id, reply_to_message, created_at are read-only;
    dst_node_id, group_id, ttl and message_type can be set (as in Flower 1.12)."""
    meta = _metadata()
    for name in ("run_id", "message_id", "src_node_id", "reply_to_message", "created_at"):
        with pytest.raises(AttributeError):
            setattr(meta, name, getattr(meta, name))
    meta.dst_node_id = 7
    meta.group_id = "h"
    meta.ttl = 10
    meta.message_type = MessageTypeLegacy.GET_PARAMETERS
    assert (meta.dst_node_id, meta.group_id, meta.ttl) == (7, "h", 10)


PARAMS = ndarrays_to_parameters([np.ones((2, 2), dtype=np.float32), np.arange(3)])


def _layout(records: RecordSet) -> dict[str, Any]:
    return {
        "parameters": {
            name: {k: (a.dtype, a.shape, a.stype, len(a.data)) for k, a in record.items()}
            for name, record in records.parameters_records.items()
        },
        "metrics": {name: dict(r) for name, r in records.metrics_records.items()},
        "configs": {name: dict(r) for name, r in records.configs_records.items()},
    }


def test_fitins_and_fitres_layout() -> None:
    """fitins.parameters (tensors "0", "1": dtype "", shape [], stype the tensor type) and
    fitins.config; fitres.parameters, .num_examples, .metrics, .status (Flower's keys)."""
    fit_ins = FitIns(PARAMS, {"lr": 0.1, "s": "x"})
    layout = _layout(compat.fitins_to_recordset(fit_ins, keep_input=True))
    assert layout == {
        "parameters": {
            "fitins.parameters": {
                "0": ("", [], "numpy.ndarray", len(PARAMS.tensors[0])),
                "1": ("", [], "numpy.ndarray", len(PARAMS.tensors[1])),
            }
        },
        "metrics": {},
        "configs": {"fitins.config": {"lr": 0.1, "s": "x"}},
    }
    fit_res = FitRes(Status(Code.OK, "ok"), PARAMS, 10, {"acc": 0.5})
    layout = _layout(compat.fitres_to_recordset(fit_res, keep_input=True))
    assert layout["metrics"] == {"fitres.num_examples": {"num_examples": 10}}
    assert layout["configs"] == {
        "fitres.metrics": {"acc": 0.5},
        "fitres.status": {"code": 0, "message": "ok"},
    }
    assert list(layout["parameters"]) == ["fitres.parameters"]


def test_evaluate_and_get_layouts() -> None:
    """evaluateres.loss / .num_examples in metrics records; the get_* records."""
    res = EvaluateRes(Status(Code.OK, "ok"), 0.25, 10, {"acc": 0.5})
    assert _layout(compat.evaluateres_to_recordset(res)) == {
        "parameters": {},
        "metrics": {
            "evaluateres.loss": {"loss": 0.25},
            "evaluateres.num_examples": {"num_examples": 10},
        },
        "configs": {
            "evaluateres.metrics": {"acc": 0.5},
            "evaluateres.status": {"code": 0, "message": "ok"},
        },
    }
    assert _layout(compat.getpropertiesins_to_recordset(GetPropertiesIns({"x": 1})))["configs"] == {
        "getpropertiesins.config": {"x": 1}
    }
    props = GetPropertiesRes(Status(Code.OK, "ok"), {"p": "v"})
    assert _layout(compat.getpropertiesres_to_recordset(props))["configs"] == {
        "getpropertiesres.properties": {"p": "v"},
        "getpropertiesres.status": {"code": 0, "message": "ok"},
    }


def test_empty_parameters_keep_their_tensor_type() -> None:
    """No tensor: one "_empty" Array carries the tensor type; an empty record gives ""."""
    empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
    record = compat.parameters_to_parametersrecord(empty, keep_input=True)
    assert {k: (a.stype, a.data) for k, a in record.items()} == {"_empty": ("numpy.ndarray", b"")}
    assert compat.parametersrecord_to_parameters(record, keep_input=True) == empty
    assert compat.parametersrecord_to_parameters(ParametersRecord(), True) == Parameters([], "")


@pytest.mark.parametrize(
    ("to_records", "from_records", "value"),
    [
        (
            lambda v: compat.fitins_to_recordset(v, True),
            lambda r: compat.recordset_to_fitins(r, True),
            FitIns(PARAMS, {"a": b"z", "t": True}),
        ),
        (
            lambda v: compat.evaluateins_to_recordset(v, True),
            lambda r: compat.recordset_to_evaluateins(r, True),
            EvaluateIns(PARAMS, {"x": 1}),
        ),
        (
            compat.getparametersins_to_recordset,
            compat.recordset_to_getparametersins,
            GetParametersIns({"x": 1}),
        ),
        (
            compat.getpropertiesins_to_recordset,
            compat.recordset_to_getpropertiesins,
            GetPropertiesIns({}),
        ),
        (
            lambda v: compat.fitres_to_recordset(v, True),
            lambda r: compat.recordset_to_fitres(r, True),
            FitRes(Status(Code.FIT_NOT_IMPLEMENTED, ""), Parameters([], ""), 0, {}),
        ),
        (
            compat.evaluateres_to_recordset,
            compat.recordset_to_evaluateres,
            EvaluateRes(Status(Code.OK, "ok"), 0.5, 3, {"m": 1}),
        ),
        (
            lambda v: compat.getparametersres_to_recordset(v, True),
            lambda r: compat.recordset_to_getparametersres(r, True),
            GetParametersRes(Status(Code.OK, "ok"), PARAMS),
        ),
        (
            compat.getpropertiesres_to_recordset,
            compat.recordset_to_getpropertiesres,
            GetPropertiesRes(Status(Code.OK, "ok"), {"p": 1.5}),
        ),
    ],
    ids=[
        "fitins",
        "evaluateins",
        "getparametersins",
        "getpropertiesins",
        "fitres",
        "evaluateres",
        "getparametersres",
        "getpropertiesres",
    ],
)
def test_conversions_round_trip(to_records: Any, from_records: Any, value: Any) -> None:
    """Every classic message comes back equal from its records."""
    assert from_records(to_records(value)) == value


def test_missing_record_names_what_was_expected() -> None:
    """A RecordSet without the record: KeyError naming it and the records present."""
    with pytest.raises(KeyError, match=r"configs_records\['fitres.status'\]"):
        compat.recordset_to_fitres(RecordSet(), keep_input=True)


def test_arrays_from_numpy_convert_back_to_parameters() -> None:
    """A mod may replace legacy arrays with array_from_numpy ones: same .npy bytes."""
    arrays = parameters_to_ndarrays(PARAMS)
    record = ParametersRecord({str(i): array_from_numpy(a) for i, a in enumerate(arrays)})
    back = parameters_to_ndarrays(compat.parametersrecord_to_parameters(record, True))
    for got, want in zip(back, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
