"""Messages validate on construction and name the field, what was expected and received."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import numpy as np
import pytest

from stamen.errors import ConfigError, StamenError
from stamen.messages import (
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

OK = Status(code=Code.OK, message="")
EMPTY = Parameters(tensors=[], tensor_type="numpy.ndarray")


def test_config_error_is_a_value_error() -> None:
    """ConfigError is both a StamenError and a ValueError (Flower raises ValueError)."""
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, StamenError)


def test_fit_res_num_examples_str_names_field_expected_and_received() -> None:
    """FitRes(num_examples="3") fails naming 'FitRes.num_examples', int and str."""
    with pytest.raises(ConfigError) as info:
        FitRes(status=OK, parameters=EMPTY, num_examples="3", metrics={})  # type: ignore[arg-type]
    text = str(info.value)
    assert "FitRes.num_examples" in text
    assert "expected int" in text
    assert "received str" in text


@pytest.mark.parametrize(
    ("build", "field", "received"),
    [
        (lambda: Parameters(tensors="ab", tensor_type=""), "Parameters.tensors", "str"),
        (lambda: Parameters(tensors=[b"x", "y"], tensor_type=""), "Parameters.tensors[1]", "str"),
        (lambda: Parameters(tensors=[], tensor_type=3), "Parameters.tensor_type", "int"),
        (lambda: Status(code=Code.OK, message=None), "Status.message", "NoneType"),
        (lambda: Status(code="OK", message=""), "Status.code", "'OK'"),
        (lambda: GetPropertiesIns(config=[]), "GetPropertiesIns.config", "list"),
        (lambda: GetParametersIns(config=None), "GetParametersIns.config", "NoneType"),
        (lambda: FitIns(parameters=[b"x"], config={}), "FitIns.parameters", "list"),
        (lambda: EvaluateIns(parameters=EMPTY, config="x"), "EvaluateIns.config", "str"),
        (lambda: GetPropertiesRes(status=0, properties={}), "GetPropertiesRes.status", "int"),
        (
            lambda: GetParametersRes(status=OK, parameters=None),
            "GetParametersRes.parameters",
            "None",
        ),
        (lambda: FitRes(OK, EMPTY, 1.0, {}), "FitRes.num_examples", "float"),
        (lambda: FitRes(OK, EMPTY, True, {}), "FitRes.num_examples", "bool"),
        (lambda: FitRes(OK, EMPTY, 1, []), "FitRes.metrics", "list"),
        (lambda: EvaluateRes(OK, "0.5", 1, {}), "EvaluateRes.loss", "str"),
        (lambda: EvaluateRes(OK, True, 1, {}), "EvaluateRes.loss", "bool"),
        (lambda: EvaluateRes(OK, 0.5, "1", {}), "EvaluateRes.num_examples", "str"),
        (lambda: ReconnectIns(seconds="5"), "ReconnectIns.seconds", "str"),
    ],
)
def test_bad_field_is_named(build: Any, field: str, received: str) -> None:
    """Every message rejects a bad field with a ConfigError naming field and received value."""
    with pytest.raises(ConfigError) as info:
        build()
    text = str(info.value)
    assert field in text
    assert "expected" in text
    assert received in text


BAD_SCALARS = [
    np.int64(3),
    np.int32(3),
    np.float32(1.5),
    np.bool_(True),
    None,
    [1, 2],
    (1,),
    {"nested": 1},
    {"nested": {"deeper": 1}},
    bytearray(b"x"),
    complex(1, 2),
    object(),
]


@pytest.mark.parametrize("value", BAD_SCALARS, ids=lambda v: type(v).__name__)
def test_bad_scalar_types_are_rejected_naming_key_and_type(value: object) -> None:
    """A metric of a non-Scalar type fails naming the mapping, the key and the type."""
    with pytest.raises(ConfigError) as info:
        FitRes(status=OK, parameters=EMPTY, num_examples=1, metrics={"acc": value})  # type: ignore[dict-item]
    text = str(info.value)
    assert "FitRes.metrics['acc']" in text
    assert "expected bool, bytes, float, int or str" in text
    assert type(value).__name__ in text


@pytest.mark.parametrize(
    "build",
    [
        lambda c: GetPropertiesIns(config=c),
        lambda c: GetParametersIns(config=c),
        lambda c: FitIns(parameters=EMPTY, config=c),
        lambda c: EvaluateIns(parameters=EMPTY, config=c),
        lambda c: GetPropertiesRes(status=OK, properties=c),
        lambda c: FitRes(status=OK, parameters=EMPTY, num_examples=0, metrics=c),
        lambda c: EvaluateRes(status=OK, loss=0.0, num_examples=0, metrics=c),
    ],
)
def test_every_scalar_mapping_is_checked(build: Any) -> None:
    """All config/metrics/properties mappings reject a bad value and a non-str key."""
    with pytest.raises(ConfigError):
        build({"x": None})
    with pytest.raises(ConfigError, match="str keys"):
        build({1: 1})
    build({"x": 1})  # and a good one passes


GOOD_SCALARS = [
    True,
    False,
    0,
    -(2**63),
    2**63 - 1,
    2**63,
    2**64 - 1,
    1.5,
    float("inf"),
    np.float64(0.25),  # a float subclass, as in Flower
    "",
    "text",
    b"",
    b"\x00\xff",
]


@pytest.mark.parametrize("value", GOOD_SCALARS, ids=repr)
def test_good_scalars_are_accepted(value: object) -> None:
    """bool, bytes, float, str and ints in [-2**63, 2**64 - 1] are valid Scalars."""
    res = FitRes(status=OK, parameters=EMPTY, num_examples=1, metrics={"k": value})  # type: ignore[dict-item]
    assert res.metrics["k"] is value


@pytest.mark.parametrize("value", [-(2**63) - 1, 2**64, 2**100, -(2**100)])
def test_ints_outside_the_wire_range_are_rejected(value: int) -> None:
    """Ints below -2**63 or above 2**64 - 1 cannot travel (sint64/uint64) and are refused."""
    with pytest.raises(ConfigError, match=re.escape("[-2**63, 2**64 - 1]")):
        GetPropertiesIns(config={"n": value})


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_num_examples_must_fit_int64(value: int) -> None:
    """num_examples is an int64 on the wire: values outside it are refused."""
    with pytest.raises(ConfigError, match=r"FitRes\.num_examples"):
        FitRes(status=OK, parameters=EMPTY, num_examples=value, metrics={})
    FitRes(status=OK, parameters=EMPTY, num_examples=2**63 - 1, metrics={})


@pytest.mark.parametrize(
    "config",
    [{"k": "\ud800"}, {"\udcff": 1}],
    ids=["value", "key"],
)
def test_strings_that_are_not_utf8_encodable_are_rejected_on_construction(
    config: dict[str, Any],
) -> None:
    """A str with a lone surrogate cannot be encoded (protobuf strings are UTF-8).

    It must fail where the message is built (ConfigError), not later in the encoder with a
    UnicodeEncodeError that, on a client, escapes ``dispatch`` and kills the node.
    """
    with pytest.raises(ConfigError):
        GetPropertiesRes(status=OK, properties=config)


@pytest.mark.parametrize("reason", list(Reason.__members__))
def test_disconnect_res_accepts_every_reason_name(reason: str) -> None:
    """DisconnectRes.reason takes the Reason names (as Flower's dataclass does)."""
    assert DisconnectRes(reason=reason).reason == reason


@pytest.mark.parametrize("reason", ["reconnect", "BOGUS", "", 1, None, Reason.ACK])
def test_disconnect_res_rejects_other_reasons(reason: object) -> None:
    """Anything but a Reason name is refused, and the message lists the valid names."""
    with pytest.raises(ConfigError) as info:
        DisconnectRes(reason=reason)  # type: ignore[arg-type]
    text = str(info.value)
    assert "DisconnectRes.reason" in text
    assert "ACK" in text
    assert "RECONNECT" in text


@pytest.mark.parametrize("seconds", [None, 0, 5, 2**63 - 1])
def test_reconnect_ins_accepts_none_zero_and_positive(seconds: int | None) -> None:
    """ReconnectIns.seconds is None (as start_server sends) or an int >= 0."""
    assert ReconnectIns(seconds=seconds).seconds == seconds


@pytest.mark.parametrize("seconds", [-1, -(2**63), 1.5, True, 2**63])
def test_reconnect_ins_rejects_negative_and_non_int(seconds: object) -> None:
    """A negative, non-int or out-of-int64 delay is refused, naming ReconnectIns.seconds."""
    with pytest.raises(ConfigError, match=r"ReconnectIns\.seconds"):
        ReconnectIns(seconds=seconds)  # type: ignore[arg-type]


def test_evaluate_res_accepts_an_int_loss() -> None:
    """EvaluateRes.loss accepts a float or an int (the message itself is lenient)."""
    assert EvaluateRes(status=OK, loss=1, num_examples=1, metrics={}).loss == 1


MESSAGES = [
    Parameters(tensors=[b"a"], tensor_type="numpy.ndarray"),
    OK,
    GetPropertiesIns(config={}),
    GetPropertiesRes(status=OK, properties={}),
    GetParametersIns(config={}),
    GetParametersRes(status=OK, parameters=EMPTY),
    FitIns(parameters=EMPTY, config={}),
    FitRes(status=OK, parameters=EMPTY, num_examples=1, metrics={}),
    EvaluateIns(parameters=EMPTY, config={}),
    EvaluateRes(status=OK, loss=0.5, num_examples=1, metrics={}),
    ReconnectIns(seconds=None),
    DisconnectRes(reason="ACK"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_are_slotted_and_a_bad_assignment_is_refused(message: object) -> None:
    """Fields may be assigned, as in Flower; an assignment of the wrong type raises
    ConfigError naming the field and leaves the message as it was. No per-instance
    __dict__ (a misspelt field is an AttributeError, not a silent new attribute)."""
    field = dataclasses.fields(message)[0].name  # type: ignore[arg-type]
    before = copy.deepcopy(message)
    with pytest.raises(ConfigError, match=re.escape(f"{type(message).__name__}.{field}")):
        setattr(message, field, object())
    assert message == before
    setattr(message, field, getattr(before, field))
    assert message == before
    assert not hasattr(message, "__dict__")
    with pytest.raises(AttributeError):
        message.no_such_field = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="cannot be deleted"):
        delattr(message, field)
    assert message == before


def test_fit_res_fields_assigned_the_way_flower_strategies_do() -> None:
    """A strategy's ``aggregate_fit`` may replace a result's parameters and weight, as
    Flower's server-side DP wrappers and users' strategies do."""
    res = FitRes(status=OK, parameters=EMPTY, num_examples=1, metrics={})
    res.parameters = Parameters(tensors=[b"x"], tensor_type="numpy.ndarray")
    res.num_examples = 7
    res.metrics["clipped"] = True
    assert res == FitRes(
        status=OK,
        parameters=Parameters(tensors=[b"x"], tensor_type="numpy.ndarray"),
        num_examples=7,
        metrics={"clipped": True},
    )
    with pytest.raises(ConfigError, match=r"FitRes\.num_examples: expected int, received float"):
        res.num_examples = 1.5  # type: ignore[assignment]
    assert res.num_examples == 7


def test_fit_res_and_evaluate_res_metrics_default_to_empty() -> None:
    """As in Flower, metrics defaults to an empty dict (a fresh one per instance)."""
    a = FitRes(status=OK, parameters=EMPTY, num_examples=1)
    b = FitRes(status=OK, parameters=EMPTY, num_examples=1)
    assert a.metrics == {}
    assert a.metrics is not b.metrics
    assert EvaluateRes(status=OK, loss=0.0, num_examples=1).metrics == {}


def test_code_and_reason_numbers_match_flower() -> None:
    """Code 0-4 and Reason 0-4 carry Flower's numbers; CLIENT_ERROR is Stamen's 5."""
    assert {c.name: int(c) for c in Code} == {
        "OK": 0,
        "GET_PROPERTIES_NOT_IMPLEMENTED": 1,
        "GET_PARAMETERS_NOT_IMPLEMENTED": 2,
        "FIT_NOT_IMPLEMENTED": 3,
        "EVALUATE_NOT_IMPLEMENTED": 4,
        "CLIENT_ERROR": 5,
    }
    assert {r.name: int(r) for r in Reason} == {
        "UNKNOWN": 0,
        "RECONNECT": 1,
        "POWER_DISCONNECTED": 2,
        "WIFI_UNAVAILABLE": 3,
        "ACK": 4,
    }
