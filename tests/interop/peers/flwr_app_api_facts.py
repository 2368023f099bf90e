"""Run in the Flower 1.12 venv: print facts of Flower's app API as JSON on stdout.

Reads a JSON request on stdin: {"modules": [...], "values": [python expressions],
"signatures": {"label": "module:qualname"}}. Prints the public names of each module, the
record layout of each classic message converted by Flower's recordset_compat, whether
MetricsRecord / ConfigsRecord accept each value, count_bytes of sample records, and
parameter names/defaults of the named callables.
"""

import hashlib
import importlib
import inspect
import json
import sys
import warnings

warnings.simplefilter("ignore")

import numpy as np  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    ConfigsRecord,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    MetricsRecord,
    Parameters,
    ParametersRecord,
    Status,
    array_from_numpy,
    ndarrays_to_parameters,
)
from flwr.common import recordset_compat as rc  # noqa: E402


def describe_value(value):
    if isinstance(value, list):
        return [describe_value(v) for v in value]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    return [type(value).__name__, value]


def layout(records):
    return {
        "parameters": {
            name: {
                key: [a.dtype, list(a.shape), a.stype, hashlib.sha256(a.data).hexdigest()]
                for key, a in record.items()
            }
            for name, record in records.parameters_records.items()
        },
        "metrics": {
            name: {k: describe_value(v) for k, v in record.items()}
            for name, record in records.metrics_records.items()
        },
        "configs": {
            name: {k: describe_value(v) for k, v in record.items()}
            for name, record in records.configs_records.items()
        },
    }


def main():
    request = json.load(sys.stdin)
    params = ndarrays_to_parameters([np.ones((2, 2), dtype=np.float32), np.arange(3)])
    config = {"lr": 0.1, "s": "x", "b": b"z", "t": True, "i": 3}
    ok = Status(Code.OK, "ok")
    layouts = {
        "fitins": rc.fitins_to_recordset(FitIns(params, config), True),
        "evaluateins": rc.evaluateins_to_recordset(EvaluateIns(params, {"x": 1}), True),
        "getparametersins": rc.getparametersins_to_recordset(GetParametersIns({"x": 1})),
        "getpropertiesins": rc.getpropertiesins_to_recordset(GetPropertiesIns({})),
        "fitres": rc.fitres_to_recordset(FitRes(ok, params, 10, {"acc": 0.5, "n": 2}), True),
        "fitres_empty": rc.fitres_to_recordset(
            FitRes(Status(Code.FIT_NOT_IMPLEMENTED, ""), Parameters([], ""), 0, {}), True
        ),
        "evaluateres": rc.evaluateres_to_recordset(EvaluateRes(ok, 0.25, 10, {"acc": 0.5})),
        "getparametersres": rc.getparametersres_to_recordset(GetParametersRes(ok, params), True),
        "getparametersres_empty": rc.getparametersres_to_recordset(
            GetParametersRes(ok, Parameters([], "numpy.ndarray")), True
        ),
        "getpropertiesres": rc.getpropertiesres_to_recordset(
            GetPropertiesRes(ok, {"p": "v", "n": 1})
        ),
    }
    accepts = {}
    for expression in request["values"]:
        value = eval(expression, {"np": np})
        row = []
        for record_type in (MetricsRecord, ConfigsRecord):
            try:
                record_type({"k": value})
                row.append(True)
            except TypeError:
                row.append(False)
        accepts[expression] = row
    array = array_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    sizes = {
        "metrics": MetricsRecord({"a": 1, "bb": [1.0, 2.0], "c": []}).count_bytes(),
        "configs": ConfigsRecord(
            {"a": "xyz", "b": b"12", "c": True, "d": [1, 2], "e": ["ab", "c"], "f": [False]}
        ).count_bytes(),
        "parameters": ParametersRecord({"weights": array}).count_bytes(),
        "array": [array.dtype, list(array.shape), array.stype, array.data.hex()],
    }
    signatures = {}
    for label, target in request["signatures"].items():
        module_name, _, qualname = target.partition(":")
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        signatures[label] = [
            [p.name, p.kind.name, None if p.default is p.empty else repr(p.default)]
            for p in inspect.signature(obj).parameters.values()
            if p.name != "self"
        ]
    names = {m: sorted(importlib.import_module(m).__all__) for m in request["modules"]}
    json.dump(
        {
            "names": names,
            "layouts": {k: layout(v) for k, v in layouts.items()},
            "accepts": accepts,
            "sizes": sizes,
            "signatures": signatures,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
