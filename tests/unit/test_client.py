"""Client, NumPyClient and dispatch: Flower's conversions, user errors become replies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stamen.client import Client, NumPyClient
from stamen.client.dispatch import error_reply, handle, normalize_client_fn
from stamen.context import Context, MetricsRecord, RecordSet
from stamen.errors import ConfigError
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
    ReconnectIns,
    Status,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays

PARAMS = [np.array([1.0, 2.0], dtype=np.float32), np.array([[3]], dtype=np.int64)]
FIT_INS = FitIns(parameters=ndarrays_to_parameters(PARAMS), config={"lr": 0.1, "epochs": 2})
EVAL_INS = EvaluateIns(parameters=ndarrays_to_parameters(PARAMS), config={"batch": 8})
GET_PARAMS_INS = GetParametersIns(config={"k": "v"})
GET_PROPS_INS = GetPropertiesIns(config={"k": 1})
INSTRUCTIONS = [GET_PROPS_INS, GET_PARAMS_INS, FIT_INS, EVAL_INS]


def _context(node_id: int = -1, node_config: dict[str, Any] | None = None) -> Context:
    return Context(node_id=node_id, node_config=node_config or {}, state=RecordSet(), run_config={})


class BareClient(Client):
    """Overrides nothing."""


class BareNumPy(NumPyClient):
    """Overrides nothing."""


class FullNumPy(NumPyClient):
    """Overrides all four methods and records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def get_properties(self, config: Any) -> dict[str, Any]:
        self.calls.append(("get_properties", None, config))
        return {"cores": 4, "name": "node"}

    def get_parameters(self, config: Any) -> list[np.ndarray]:
        self.calls.append(("get_parameters", None, config))
        return [np.ones(3, dtype=np.float32)]

    def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.calls.append(("fit", parameters, config))
        return [p * 2 for p in parameters], 10, {"train_loss": 0.25}

    def evaluate(self, parameters: Any, config: Any) -> tuple[float, int, dict[str, Any]]:
        self.calls.append(("evaluate", parameters, config))
        return 0.5, 7, {"accuracy": 0.9}


# --- Client base ---------------------------------------------------------------------------


def test_client_base_methods_answer_not_implemented_with_empty_payloads() -> None:
    """Un-overridden Client methods answer codes 1..4 with empty payloads (Flower's codes)."""
    client = BareClient()
    props = client.get_properties(GET_PROPS_INS)
    assert props.status.code == Code.GET_PROPERTIES_NOT_IMPLEMENTED == 1
    assert props.properties == {}
    params = client.get_parameters(GET_PARAMS_INS)
    assert params.status.code == Code.GET_PARAMETERS_NOT_IMPLEMENTED == 2
    assert params.parameters.tensors == []
    fit = client.fit(FIT_INS)
    assert fit.status.code == Code.FIT_NOT_IMPLEMENTED == 3
    assert (fit.parameters.tensors, fit.num_examples, fit.metrics) == ([], 0, {})
    ev = client.evaluate(EVAL_INS)
    assert ev.status.code == Code.EVALUATE_NOT_IMPLEMENTED == 4
    assert (ev.loss, ev.num_examples, ev.metrics) == (0.0, 0, {})


def test_client_to_client_is_itself() -> None:
    """Client.to_client() returns the client itself."""
    client = BareClient()
    assert client.to_client() is client


# --- NumPyClient.to_client -----------------------------------------------------------------


def test_numpy_client_overridden_methods_are_called_and_converted() -> None:
    """to_client() decodes parameters, calls the NumPyClient and encodes its results."""
    numpy_client = FullNumPy()
    client = numpy_client.to_client()
    assert isinstance(client, Client)

    props = client.get_properties(GET_PROPS_INS)
    assert props == GetPropertiesRes(status=props.status, properties={"cores": 4, "name": "node"})
    assert props.status.code == Code.OK

    params = client.get_parameters(GET_PARAMS_INS)
    assert params.status.code == Code.OK
    assert params.parameters.tensor_type == "numpy.ndarray"
    (array,) = parameters_to_ndarrays(params.parameters)
    assert array.dtype == np.float32
    assert array.tolist() == [1.0, 1.0, 1.0]

    fit = client.fit(FIT_INS)
    assert fit.status.code == Code.OK
    assert fit.num_examples == 10
    assert fit.metrics == {"train_loss": 0.25}
    doubled = parameters_to_ndarrays(fit.parameters)
    assert [a.tolist() for a in doubled] == [[2.0, 4.0], [[6]]]
    assert [a.dtype for a in doubled] == [np.float32, np.int64]

    ev = client.evaluate(EVAL_INS)
    assert ev == EvaluateRes(status=ev.status, loss=0.5, num_examples=7, metrics={"accuracy": 0.9})
    assert ev.status.code == Code.OK

    names = [c[0] for c in numpy_client.calls]
    assert names == ["get_properties", "get_parameters", "fit", "evaluate"]
    _, fit_params, fit_config = numpy_client.calls[2]
    assert fit_config == {"lr": 0.1, "epochs": 2}
    assert [a.tolist() for a in fit_params] == [[1.0, 2.0], [[3]]]
    assert numpy_client.calls[1][2] == {"k": "v"}


def test_numpy_client_non_overridden_methods_answer_not_implemented() -> None:
    """A NumPyClient overriding only fit answers NOT_IMPLEMENTED for the other three."""

    class OnlyFit(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            return parameters, 1, {}

    client = OnlyFit().to_client()
    assert client.fit(FIT_INS).status.code == Code.OK
    assert client.get_properties(GET_PROPS_INS).status.code == Code.GET_PROPERTIES_NOT_IMPLEMENTED
    assert client.get_parameters(GET_PARAMS_INS).status.code == Code.GET_PARAMETERS_NOT_IMPLEMENTED
    evaluated = client.evaluate(EVAL_INS)
    assert evaluated.status.code == Code.EVALUATE_NOT_IMPLEMENTED
    assert (evaluated.loss, evaluated.num_examples, evaluated.metrics) == (0.0, 0, {})


def test_bare_numpy_client_answers_not_implemented_everywhere() -> None:
    """A NumPyClient overriding nothing answers codes 1..4 for the four methods."""
    client = BareNumPy().to_client()
    assert client.get_properties(GET_PROPS_INS).status.code == 1
    assert client.get_parameters(GET_PARAMS_INS).status.code == 2
    assert client.fit(FIT_INS).status.code == 3
    assert client.evaluate(EVAL_INS).status.code == 4


def _fit_returning(value: Any) -> Client:
    class Returns(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            return value

    return Returns().to_client()


@pytest.mark.parametrize(
    ("value", "received"),
    [
        ((np.ones(2), np.ones(2), np.ones(2)), "ndarray"),
        (([np.ones(2)], np.int64(3), {}), "int64"),
        (([np.ones(2)], 3), "2"),
        (([np.ones(2)], 3, {}, {}), "4"),
        (([np.ones(2)], "3", {}), "str"),
        (([np.ones(2)], 3, None), "NoneType"),
        (None, "NoneType"),
    ],
    ids=[
        "tuple of arrays",
        "np.int64 num_examples",
        "2 elements",
        "4 elements",
        "str n",
        "None metrics",
        "None",
    ],
)
def test_numpy_fit_bad_return_is_a_type_error_naming_expected_and_received(
    value: Any, received: str
) -> None:
    """NumPyClient.fit must return (list, int, dict); else TypeError says what and got what."""
    with pytest.raises(TypeError) as info:
        _fit_returning(value).fit(FIT_INS)
    text = str(info.value)
    assert "NumPyClient.fit" in text
    assert "expected" in text
    assert "received" in text
    assert received in text


def _evaluate_returning(value: Any) -> Client:
    class Returns(NumPyClient):
        def evaluate(self, parameters: Any, config: Any) -> Any:
            return value

    return Returns().to_client()


@pytest.mark.parametrize(
    ("value", "received"),
    [
        ((1, 3, {}), "int"),
        ((np.float32(0.5), 3, {}), "float32"),
        (("0.5", 3, {}), "str"),
        ((0.5, np.int64(3), {}), "int64"),
        ((0.5, 3), "2"),
    ],
    ids=["int loss", "np.float32 loss", "str loss", "np.int64 n", "2 elements"],
)
def test_numpy_evaluate_bad_return_is_a_type_error(value: Any, received: str) -> None:
    """NumPyClient.evaluate must return (float, int, dict): int or np.float32 loss fail."""
    with pytest.raises(TypeError) as info:
        _evaluate_returning(value).evaluate(EVAL_INS)
    text = str(info.value)
    assert "NumPyClient.evaluate" in text
    assert "expected" in text
    assert received in text


def test_numpy_evaluate_accepts_np_float64_loss() -> None:
    """np.float64 is a float subclass, so Flower (and Stamen) accept it as a loss."""
    result = _evaluate_returning((np.float64(0.125), 4, {"a": 1})).evaluate(EVAL_INS)
    assert result.status.code == Code.OK
    assert result.loss == 0.125
    assert result.num_examples == 4


def test_get_parameters_is_not_type_checked_a_bare_array_is_its_rows() -> None:
    """As in Flower, get_parameters returning a bare ndarray sends one tensor per row."""

    class Bare(NumPyClient):
        def get_parameters(self, config: Any) -> Any:
            return np.arange(6.0).reshape(3, 2)

    res = Bare().to_client().get_parameters(GET_PARAMS_INS)
    assert [a.tolist() for a in parameters_to_ndarrays(res.parameters)] == [
        [0.0, 1.0],
        [2.0, 3.0],
        [4.0, 5.0],
    ]


# --- context property ----------------------------------------------------------------------


@pytest.mark.parametrize("client", [BareClient(), BareNumPy()], ids=["Client", "NumPyClient"])
def test_deprecated_context_property_warns_and_works(client: Any) -> None:
    """``.context`` still gets and sets the Context, with a DeprecationWarning each time."""
    context = _context(node_id=3)
    client.set_context(context)
    with pytest.warns(DeprecationWarning, match="context"):
        assert client.context is context
    other = _context(node_id=4)
    with pytest.warns(DeprecationWarning, match="context"):
        client.context = other
    assert client.get_context() is other


def test_get_context_without_a_context_raises() -> None:
    """get_context() outside of a message raises AttributeError instead of returning None."""
    with pytest.raises(AttributeError):
        BareClient().get_context()


# --- dispatch.handle -----------------------------------------------------------------------


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=lambda m: type(m).__name__)
def test_handle_runs_each_instruction_on_the_built_client(instruction: Any) -> None:
    """handle() builds the client with client_fn(context) and returns the matching reply."""
    expected = {
        GetPropertiesIns: GetPropertiesRes,
        GetParametersIns: GetParametersRes,
        FitIns: FitRes,
        EvaluateIns: EvaluateRes,
    }[type(instruction)]
    reply = handle(lambda context: FullNumPy().to_client(), _context(), instruction)
    assert type(reply) is expected
    assert reply.status.code == Code.OK


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=lambda m: type(m).__name__)
def test_exception_in_client_method_becomes_client_error_reply(instruction: Any) -> None:
    """A user exception in fit (etc.) never reaches the caller: CLIENT_ERROR names it."""

    class Broken(NumPyClient):
        def get_properties(self, config: Any) -> Any:
            raise RuntimeError("boom in get_properties")

        def get_parameters(self, config: Any) -> Any:
            raise RuntimeError("boom in get_parameters")

        def fit(self, parameters: Any, config: Any) -> Any:
            raise RuntimeError("boom in fit")

        def evaluate(self, parameters: Any, config: Any) -> Any:
            raise RuntimeError("boom in evaluate")

    reply = handle(lambda context: Broken().to_client(), _context(), instruction)
    assert type(reply) is type(error_reply(instruction, ""))
    assert reply.status.code == Code.CLIENT_ERROR
    assert "RuntimeError" in reply.status.message
    assert "boom in" in reply.status.message


def test_fit_error_reply_has_empty_payload() -> None:
    """The CLIENT_ERROR FitRes carries no parameters and 0 examples (counted as a failure)."""

    class Broken(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            raise ValueError("bad data")

    reply = handle(lambda context: Broken().to_client(), _context(), FIT_INS)
    assert isinstance(reply, FitRes)
    assert reply.status == Status(code=Code.CLIENT_ERROR, message=reply.status.message)
    assert reply.parameters.tensors == []
    assert reply.num_examples == 0
    assert "fit" in reply.status.message
    assert "ValueError: bad data" in reply.status.message


def test_type_error_of_numpy_fit_becomes_client_error_reply() -> None:
    """A NumPyClient.fit returning the wrong shape gives CLIENT_ERROR naming TypeError."""
    reply = handle(lambda context: _fit_returning((np.ones(1),) * 3), _context(), FIT_INS)
    assert reply.status.code == Code.CLIENT_ERROR
    assert "TypeError" in reply.status.message


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=lambda m: type(m).__name__)
def test_exception_in_client_fn_becomes_client_error_reply(instruction: Any) -> None:
    """client_fn raising gives a CLIENT_ERROR reply of the right type naming client_fn."""

    def client_fn(context: Context) -> Client:
        raise KeyError("partition-id")

    reply = handle(client_fn, _context(), instruction)
    assert type(reply) is type(error_reply(instruction, ""))
    assert reply.status.code == Code.CLIENT_ERROR
    assert "client_fn" in reply.status.message
    assert "KeyError" in reply.status.message


def test_client_fn_returning_a_non_client_becomes_client_error() -> None:
    """client_fn returning neither Client nor NumPyClient gives CLIENT_ERROR (TypeError)."""
    reply = handle(lambda context: 42, _context(), FIT_INS)  # type: ignore[arg-type, return-value]
    assert reply.status.code == Code.CLIENT_ERROR
    assert "TypeError" in reply.status.message
    assert "int" in reply.status.message


def test_client_returning_the_wrong_reply_type_becomes_client_error() -> None:
    """A Client.fit returning something else than FitRes gives CLIENT_ERROR naming both."""

    class Wrong(Client):
        def fit(self, ins: FitIns) -> Any:
            return GetPropertiesRes(status=Status(Code.OK, ""), properties={})

    reply = handle(lambda context: Wrong(), _context(), FIT_INS)
    assert isinstance(reply, FitRes)
    assert reply.status.code == Code.CLIENT_ERROR
    assert "FitRes" in reply.status.message
    assert "GetPropertiesRes" in reply.status.message


def test_client_fn_returning_a_numpy_client_is_converted() -> None:
    """A NumPyClient returned by client_fn without .to_client() is converted (as Flower)."""
    reply = handle(lambda context: FullNumPy(), _context(), FIT_INS)  # type: ignore[arg-type, return-value]
    assert reply.status.code == Code.OK
    assert isinstance(reply, FitRes)
    assert reply.num_examples == 10


def test_handle_refuses_reconnect_ins() -> None:
    """ReconnectIns is the session's business, not a client's: ConfigError."""
    with pytest.raises(ConfigError):
        handle(lambda context: BareClient(), _context(), ReconnectIns(seconds=0))


def test_error_reply_refuses_reconnect_ins() -> None:
    """There is no error reply for ReconnectIns."""
    with pytest.raises(ConfigError):
        error_reply(ReconnectIns(seconds=0), "x")


def test_client_fn_called_once_per_message_and_state_persists() -> None:
    """client_fn builds a new client per message; context.state carries over (Flower 2.6)."""
    built: list[Client] = []

    class Counting(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            state = self.get_context().state
            record = state.metrics_records.setdefault("counter", MetricsRecord({"n": 0}))
            record["n"] = int(record["n"]) + 1
            return parameters, 1, {"n": record["n"]}

    def client_fn(context: Context) -> Client:
        client = Counting().to_client()
        built.append(client)
        return client

    context = _context()
    counts = []
    for _ in range(3):
        reply = handle(client_fn, context, FIT_INS)
        assert isinstance(reply, FitRes)
        counts.append(reply.metrics["n"])
    assert counts == [1, 2, 3]
    assert len(built) == 3
    assert len({id(c) for c in built}) == 3
    assert context.state.metrics_records["counter"]["n"] == 3


def test_handle_sets_the_context_on_the_client() -> None:
    """The client built for a message sees that message's Context via get_context()."""
    seen: list[Context] = []

    class Seeing(NumPyClient):
        def get_properties(self, config: Any) -> Any:
            seen.append(self.get_context())
            return {}

    context = _context(node_id=12)
    handle(lambda c: Seeing().to_client(), context, GET_PROPS_INS)
    assert seen == [context]
    assert seen[0] is context


# --- normalize_client_fn -------------------------------------------------------------------


def test_context_client_fn_is_passed_through() -> None:
    """A client_fn(context) is used as is, without warnings."""

    def client_fn(context: Context) -> Client:
        return BareClient()

    assert normalize_client_fn(client_fn) is client_fn


@pytest.mark.parametrize(
    ("node_config", "node_id", "expected_cid"),
    [({"partition-id": 3}, 99, "3"), ({}, 7, "7")],
    ids=["partition id", "node id"],
)
def test_legacy_cid_client_fn_gets_partition_or_node_id_with_deprecation(
    node_config: dict[str, Any], node_id: int, expected_cid: str
) -> None:
    """client_fn(cid: str) receives str(partition-id), else str(node_id), and warns."""
    received: list[Any] = []

    def client_fn(cid: str) -> Client:
        received.append(cid)
        return FullNumPy().to_client()

    normalized = normalize_client_fn(client_fn)
    with pytest.warns(DeprecationWarning, match="client_fn"):
        reply = handle(normalized, _context(node_id, node_config), FIT_INS)
    assert reply.status.code == Code.OK
    assert received == [expected_cid]


def test_legacy_client_fn_detected_by_parameter_name_cid() -> None:
    """A one-parameter client_fn named ``cid`` (no annotation) is the legacy form too."""
    received: list[Any] = []

    def client_fn(cid):  # type: ignore[no-untyped-def]
        received.append(cid)
        return BareClient()

    normalized = normalize_client_fn(client_fn)
    with pytest.warns(DeprecationWarning, match="cid: str"):
        handle(normalized, _context(5), GET_PROPS_INS)
    assert received == ["5"]


def test_legacy_client_fn_detected_by_str_annotation() -> None:
    """A one-parameter client_fn annotated ``str`` is the legacy form whatever its name."""
    received: list[Any] = []

    def client_fn(partition: str) -> Client:
        received.append(partition)
        return BareClient()

    with pytest.warns(DeprecationWarning, match="cid: str"):
        handle(normalize_client_fn(client_fn), _context(8), GET_PROPS_INS)
    assert received == ["8"]


@pytest.mark.parametrize(
    "client_fn",
    [
        lambda context, extra: BareClient(),
        lambda: BareClient(),
        lambda a, b, c: BareClient(),
    ],
    ids=["2 params", "0 params", "3 params"],
)
def test_client_fn_of_other_arity_is_a_config_error(client_fn: Any) -> None:
    """client_fn must take exactly one argument: other arities raise ConfigError."""
    with pytest.raises(ConfigError, match="client_fn"):
        normalize_client_fn(client_fn)


def test_client_fn_with_optional_extra_parameter_is_accepted() -> None:
    """Parameters with defaults do not count: fn(context, extra=1) is a valid client_fn."""

    def client_fn(context: Context, extra: int = 1) -> Client:
        return BareClient()

    assert normalize_client_fn(client_fn) is client_fn


def test_non_callable_client_fn_is_a_config_error() -> None:
    """A non-callable client_fn raises ConfigError naming what was received."""
    with pytest.raises(ConfigError, match="str"):
        normalize_client_fn("not a function")  # type: ignore[arg-type]


def test_error_reply_parameters_are_empty() -> None:
    """error_reply builds empty payloads of the right reply type."""
    reply = error_reply(GET_PARAMS_INS, "why")
    assert reply == GetParametersRes(
        status=Status(code=Code.CLIENT_ERROR, message="why"),
        parameters=Parameters(tensors=[], tensor_type=""),
    )
