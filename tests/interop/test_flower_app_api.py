"""Flower 1.12's app API, read from a real Flower: names, record layouts, record checks,
signatures. Stamen must match, or list the name in docs/compatibility.md with a reason."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stamen.common.recordset_compat as rc
from stamen.common import ConfigsRecord, MetricsRecord, ParametersRecord, array_from_numpy
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
from stamen.ndarrays import ndarrays_to_parameters
from stamen.records import RecordSet

from ._harness import REPO, flower_python, peer_env

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).resolve().parent / "peers" / "flwr_app_api_facts.py"
COMPATIBILITY = REPO / "docs" / "compatibility.md"
MODULES = ["flwr.client", "flwr.server", "flwr.server.strategy", "flwr.simulation", "flwr.common"]
VALUES = [
    "1", "1.5", "True", "'s'", "b'b'", "None", "(1, 2)", "[1, 2]", "[1.0]", "[]", "[1, 2.0]",
    "[1, True]", "[True, 1]", "[True]", "['a', 'b']", "[b'x']", "{'x': 1}",
    "np.float64(1)", "np.float32(1)", "np.int64(1)", "[np.float64(1)]",
]  # fmt: skip
SIGNATURES = {
    "ClientApp": "flwr.client:ClientApp.__init__",
    "ServerApp": "flwr.server:ServerApp.__init__",
    "ServerAppComponents": "flwr.server:ServerAppComponents.__init__",
    "run_simulation": "flwr.simulation:run_simulation",
    "start_numpy_client": "flwr.client:start_numpy_client",
    "configure": "flwr.common.logger:configure",
    "log": "flwr.common.logger:log",
    "Context": "flwr.common:Context.__init__",
    "Message": "flwr.common:Message.__init__",
    "Metadata": "flwr.common:Metadata.__init__",
    "Error": "flwr.common:Error.__init__",
    "Array": "flwr.common:Array.__init__",
    "RecordSet": "flwr.common:RecordSet.__init__",
    "ParametersRecord": "flwr.common:ParametersRecord.__init__",
    "MetricsRecord": "flwr.common:MetricsRecord.__init__",
    "ConfigsRecord": "flwr.common:ConfigsRecord.__init__",
}


@functools.cache
def flower_facts() -> dict[str, Any]:
    request = {"modules": MODULES, "values": VALUES, "signatures": SIGNATURES}
    done = subprocess.run(
        [str(flower_python()), str(SCRIPT)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        env=peer_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    facts: dict[str, Any] = json.loads(done.stdout)
    return facts


def left_out() -> dict[str, str]:
    """The table of docs/compatibility.md's "Left out on purpose": name -> reason."""
    text = COMPATIBILITY.read_text()
    section = text.split("## Left out on purpose", 1)[1]
    rows = re.findall(r"^\| `(flwr\.[\w.]+)` \| (.+?) \|$", section, flags=re.MULTILINE)
    return dict(rows)


def test_every_flower_public_name_exists_or_is_documented_as_left_out() -> None:
    """Each name of Flower 1.12's five public modules is in Stamen's module of the same
    path, or in the left-out table with a reason; the table lists only missing names."""
    documented = left_out()
    missing = []
    present_but_listed = []
    for module, names in flower_facts()["names"].items():
        ours = importlib.import_module(module.replace("flwr", "stamen", 1))
        for name in names:
            full = f"{module}.{name}"
            if hasattr(ours, name):
                if full in documented:
                    present_but_listed.append(full)
            elif full not in documented:
                missing.append(full)
    assert missing == [], f"neither in Stamen nor in docs/compatibility.md: {missing}"
    assert present_but_listed == [], f"listed as left out but present: {present_but_listed}"
    assert all(len(reason) > 20 for reason in documented.values())
    assert len(documented) <= 12, "the left-out list should stay short"


PARAMS = ndarrays_to_parameters([np.ones((2, 2), dtype=np.float32), np.arange(3)])
OK = Status(Code.OK, "ok")
OURS: dict[str, Any] = {
    "fitins": lambda: rc.fitins_to_recordset(
        FitIns(PARAMS, {"lr": 0.1, "s": "x", "b": b"z", "t": True, "i": 3}), True
    ),
    "evaluateins": lambda: rc.evaluateins_to_recordset(EvaluateIns(PARAMS, {"x": 1}), True),
    "getparametersins": lambda: rc.getparametersins_to_recordset(GetParametersIns({"x": 1})),
    "getpropertiesins": lambda: rc.getpropertiesins_to_recordset(GetPropertiesIns({})),
    "fitres": lambda: rc.fitres_to_recordset(FitRes(OK, PARAMS, 10, {"acc": 0.5, "n": 2}), True),
    "fitres_empty": lambda: rc.fitres_to_recordset(
        FitRes(Status(Code.FIT_NOT_IMPLEMENTED, ""), Parameters([], ""), 0, {}), True
    ),
    "evaluateres": lambda: rc.evaluateres_to_recordset(EvaluateRes(OK, 0.25, 10, {"acc": 0.5})),
    "getparametersres": lambda: rc.getparametersres_to_recordset(
        GetParametersRes(OK, PARAMS), True
    ),
    "getparametersres_empty": lambda: rc.getparametersres_to_recordset(
        GetParametersRes(OK, Parameters([], "numpy.ndarray")), True
    ),
    "getpropertiesres": lambda: rc.getpropertiesres_to_recordset(
        GetPropertiesRes(OK, {"p": "v", "n": 1})
    ),
}


def _describe(value: Any) -> Any:
    if isinstance(value, list):
        return [_describe(v) for v in value]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    return [type(value).__name__, value]


def _layout(records: RecordSet) -> dict[str, Any]:
    return {
        "parameters": {
            name: {
                key: [a.dtype, list(a.shape), a.stype, hashlib.sha256(a.data).hexdigest()]
                for key, a in record.items()
            }
            for name, record in records.parameters_records.items()
        },
        "metrics": {
            name: {k: _describe(v) for k, v in record.items()}
            for name, record in records.metrics_records.items()
        },
        "configs": {
            name: {k: _describe(v) for k, v in record.items()}
            for name, record in records.configs_records.items()
        },
    }


@pytest.mark.parametrize("message", sorted(OURS))
def test_legacy_record_layout_equals_flowers(message: str) -> None:
    """Record names, keys, value types and array bytes equal Flower's recordset_compat."""
    assert _layout(OURS[message]()) == flower_facts()["layouts"][message]


def test_record_type_checks_accept_and_reject_what_flower_does() -> None:
    """MetricsRecord / ConfigsRecord accept exactly the values Flower's accept."""
    ours = {}
    for expression in VALUES:
        value = eval(expression, {"np": np})
        row = []
        for record_type in (MetricsRecord, ConfigsRecord):
            try:
                record_type({"k": value})
                row.append(True)
            except TypeError:
                row.append(False)
        ours[expression] = row
    assert ours == flower_facts()["accepts"]


def test_count_bytes_and_array_from_numpy_equal_flowers() -> None:
    """count_bytes of the three record types, and array_from_numpy's Array, byte for byte."""
    array = array_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    ours = {
        "metrics": MetricsRecord({"a": 1, "bb": [1.0, 2.0], "c": []}).count_bytes(),
        "configs": ConfigsRecord(
            {"a": "xyz", "b": b"12", "c": True, "d": [1, 2], "e": ["ab", "c"], "f": [False]}
        ).count_bytes(),
        "parameters": ParametersRecord({"weights": array}).count_bytes(),
        "array": [array.dtype, list(array.shape), array.stype, array.data.hex()],
    }
    assert ours == flower_facts()["sizes"]


@pytest.mark.parametrize("label", sorted(SIGNATURES))
def test_signatures_have_flowers_parameter_names_kinds_and_defaults(label: str) -> None:
    """Same parameters, in order, of the same kind, with the same defaults."""
    module, _, qualname = SIGNATURES[label].partition(":")
    obj: Any = importlib.import_module(module.replace("flwr", "stamen", 1))
    for part in qualname.split("."):
        obj = getattr(obj, part)
    ours = [
        [p.name, p.kind.name, None if p.default is p.empty else repr(p.default)]
        for p in inspect.signature(obj).parameters.values()
        if p.name != "self"
    ]
    assert ours == flower_facts()["signatures"][label]
