"""ClientApp, client mods, ServerApp and the unsupported Message/Driver API (no sockets)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.client import deprecated as start_numpy_client_module
from stamen.client.client_app import instruction_to_message
from stamen.client.dispatch import handle
from stamen.common import (
    Context,
    Message,
    MessageType,
    RecordSet,
    array_from_numpy,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from stamen.common.recordset_compat import (
    parameters_to_parametersrecord,
    parametersrecord_to_parameters,
)
from stamen.errors import ConfigError
from stamen.messages import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, GetPropertiesIns
from stamen.server import ServerApp, ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg

FIT_INS = FitIns(ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]), {"lr": 1.0})


class AddClient(fl.client.NumPyClient):
    """Adds ``config["lr"]`` times 10 to every parameter (an update of norm 20 on 2 zeros...)."""

    def fit(self, parameters: Any, config: Any) -> Any:
        return [p + 10 * config["lr"] for p in parameters], 4, {"trained": True}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return float(parameters[0].sum()), 4, {}


def client_fn(context: Context) -> fl.client.Client:
    return AddClient().to_client()


def _context(node_id: int = 3) -> Context:
    return Context(node_id=node_id, node_config={}, state=RecordSet(), run_config={})


# Mods written the way Flower's documentation writes them.
calls: list[str] = []


def example_mod_1(msg: Message, context: Context, call_next: Any) -> Message:
    calls.append("mod1 before")
    out = call_next(msg, context)
    calls.append("mod1 after")
    return out


def example_mod_2(msg: Message, context: Context, call_next: Any) -> Message:
    calls.append(f"mod2 before {msg.metadata.message_type}")
    out = call_next(msg, context)
    calls.append("mod2 after")
    return out


def clip_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Clip every parameter of the fit reply to [-1, 1] (Flower-style mod)."""
    fit_res = call_next(msg, ctxt)
    if msg.metadata.message_type == MessageType.TRAIN:
        record = fit_res.content.parameters_records["fitres.parameters"]
        params = parametersrecord_to_parameters(record, keep_input=False)
        clipped = [np.clip(a, -1.0, 1.0) for a in parameters_to_ndarrays(params)]
        fit_res.content.parameters_records["fitres.parameters"] = parameters_to_parametersrecord(
            ndarrays_to_parameters(clipped), keep_input=True
        )
    return fit_res


def halve_lr_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Change what the client receives: halve the learning rate in the fit config."""
    if msg.metadata.message_type == MessageType.TRAIN:
        config = msg.content.configs_records["fitins.config"]
        config["lr"] = float(config["lr"]) / 2
    return call_next(msg, ctxt)


def test_without_mods_the_app_is_its_client_fn() -> None:
    """No mods: the node runs client_fn itself (the plain path, no Message built)."""
    app = fl.client.ClientApp(client_fn=client_fn)
    assert app.to_client_fn() is client_fn


def test_mods_run_around_each_message_first_outermost() -> None:
    """mods=[m1, m2]: m1 before, m2 before, client, m2 after, m1 after."""
    calls.clear()
    app = fl.client.ClientApp(client_fn=client_fn, mods=[example_mod_1, example_mod_2])
    reply = handle(app.to_client_fn(), _context(), FIT_INS)
    assert isinstance(reply, FitRes)
    assert reply.status.code == Code.OK
    assert calls == ["mod1 before", "mod2 before train", "mod2 after", "mod1 after"]
    np.testing.assert_array_equal(parameters_to_ndarrays(reply.parameters)[0], [10, 10])
    assert reply.metrics == {"trained": True}


def test_a_mod_changing_the_reply_changes_what_the_server_gets() -> None:
    """A clipping mod: the FitRes has the clipped parameters."""
    app = fl.client.ClientApp(client_fn=client_fn, mods=[clip_mod])
    reply = handle(app.to_client_fn(), _context(), FIT_INS)
    assert isinstance(reply, FitRes)
    np.testing.assert_array_equal(parameters_to_ndarrays(reply.parameters)[0], [1, 1])
    assert reply.num_examples == 4


def test_a_mod_changing_the_instruction_changes_what_the_client_receives() -> None:
    """A mod halving config["lr"]: the client trains with 0.5."""
    app = fl.client.ClientApp(client_fn=client_fn, mods=[halve_lr_mod])
    reply = handle(app.to_client_fn(), _context(), FIT_INS)
    assert isinstance(reply, FitRes)
    np.testing.assert_array_equal(parameters_to_ndarrays(reply.parameters)[0], [5, 5])


def test_mods_see_metadata_and_the_node_context() -> None:
    """The Message's metadata: message type, dst_node_id = the node, src 0, run 0; the
    mod gets the node's Context (state persists)."""
    seen: list[tuple[Any, ...]] = []

    def spy(msg: Message, context: Context, call_next: Any) -> Message:
        meta = msg.metadata
        seen.append((meta.message_type, meta.dst_node_id, meta.src_node_id, meta.run_id))
        counter = context.state.metrics_records.setdefault("mod", fl.common.MetricsRecord())
        counter["n"] = int(counter.get("n", 0)) + 1
        reply = call_next(msg, context)
        assert reply.metadata.reply_to_message == meta.message_id
        return reply

    app = fl.client.ClientApp(client_fn=client_fn, mods=[spy])
    context = _context(node_id=42)
    fn = app.to_client_fn()
    handle(fn, context, FIT_INS)
    handle(fn, context, EvaluateIns(FIT_INS.parameters, {}))
    handle(fn, context, GetPropertiesIns({}))
    assert seen == [
        ("train", 42, 0, 0),
        ("evaluate", 42, 0, 0),
        ("get_properties", 42, 0, 0),
    ]
    assert context.state.metrics_records["mod"]["n"] == 3


def test_client_exception_travels_through_mods_and_becomes_client_error() -> None:
    """The client raises: mods see the exception (as in Flower); the reply is CLIENT_ERROR."""
    seen: list[str] = []

    class Broken(fl.client.NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            raise RuntimeError("boom")

    def watch(msg: Message, context: Context, call_next: Any) -> Message:
        try:
            return call_next(msg, context)  # type: ignore[no-any-return]
        except RuntimeError as exc:
            seen.append(str(exc))
            raise

    app = fl.client.ClientApp(client_fn=lambda context: Broken().to_client(), mods=[watch])
    reply = handle(app.to_client_fn(), _context(), FIT_INS)
    assert isinstance(reply, FitRes)
    assert reply.status.code == Code.CLIENT_ERROR
    assert "boom" in reply.status.message
    assert seen == ["boom"]


def test_a_method_the_client_lacks_is_not_implemented_through_mods() -> None:
    """No evaluate: EVALUATE_NOT_IMPLEMENTED comes back through the mods."""

    class FitOnly(fl.client.NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            return parameters, 1, {}

    app = fl.client.ClientApp(client_fn=lambda c: FitOnly().to_client(), mods=[example_mod_1])
    reply = handle(app.to_client_fn(), _context(), EvaluateIns(FIT_INS.parameters, {}))
    assert isinstance(reply, EvaluateRes)
    assert reply.status.code == Code.EVALUATE_NOT_IMPLEMENTED


def test_client_app_is_callable_with_a_message() -> None:
    """app(message, context) -> reply Message, as Flower's ClientApp.__call__."""
    app = fl.client.ClientApp(client_fn=client_fn)
    reply = app(instruction_to_message(FIT_INS, _context()), _context())
    assert reply.has_content()
    assert reply.content.metrics_records["fitres.num_examples"]["num_examples"] == 4
    query = instruction_to_message(FIT_INS, _context())
    query.metadata.message_type = MessageType.QUERY
    with pytest.raises(ValueError, match="received 'query'"):
        app(query, _context())


def test_stateful_client_example_runs_unchanged() -> None:
    """Flower's stateful NumPyClient pattern: a ParametersRecord of Arrays and a
    MetricsRecord in context.state, read and written across messages."""

    class StatefulClient(fl.client.NumPyClient):
        def __init__(self, context: Context) -> None:
            self.client_state = context.state
            if "fit_metrics" not in self.client_state.configs_records:
                self.client_state.configs_records["fit_metrics"] = fl.common.ConfigsRecord()

        def fit(self, parameters: Any, config: Any) -> Any:
            records = self.client_state.parameters_records
            if "local" in records:
                bias = records["local"]["bias"].numpy()
            else:
                bias = np.zeros(2, dtype=np.float32)
            bias = bias + 1
            records["local"] = fl.common.ParametersRecord({"bias": array_from_numpy(bias)})
            fit_metrics = self.client_state.configs_records["fit_metrics"]
            if "rounds" not in fit_metrics:
                fit_metrics["rounds"] = [1]
            else:
                fit_metrics["rounds"] = [*fit_metrics["rounds"], len(fit_metrics["rounds"]) + 1]  # type: ignore[misc]
            return [p + bias for p in parameters], 1, {"bias": float(bias[0])}

    app = fl.client.ClientApp(client_fn=lambda context: StatefulClient(context).to_client())
    context = _context()
    biases = []
    for _ in range(3):
        reply = handle(app.to_client_fn(), context, FIT_INS)
        assert isinstance(reply, FitRes), reply
        assert reply.status.code == Code.OK, reply.status
        biases.append(reply.metrics["bias"])
    assert biases == [1.0, 2.0, 3.0]
    assert context.state.configs_records["fit_metrics"]["rounds"] == [1, 2, 3]


def test_node_config_entries_reach_client_fn() -> None:
    """to_client_fn(node_config=...) adds entries to context.node_config."""
    seen: list[dict[str, Any]] = []

    def fn(context: Context) -> fl.client.Client:
        seen.append(dict(context.node_config))
        return AddClient().to_client()

    app = fl.client.ClientApp(client_fn=fn)
    handle(app.to_client_fn({"partition-id": 1}), _context(), FIT_INS)
    assert seen == [{"partition-id": 1}]


def test_client_app_validates_its_arguments() -> None:
    """client_fn of two args, mods not callable: ConfigError naming what was received."""
    with pytest.raises(ConfigError, match="client_fn"):
        fl.client.ClientApp(client_fn=lambda a, b: None)
    with pytest.raises(ConfigError, match=r"mods\[0\]: expected a callable .*received int"):
        fl.client.ClientApp(client_fn=client_fn, mods=[1])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="expected a client_fn"):
        fl.client.ClientApp().to_client_fn()


@pytest.mark.parametrize("name", ["train", "evaluate", "query"])
def test_message_api_decorators_raise_not_implemented(name: str) -> None:
    """@app.train() etc.: NotImplementedError naming ClientApp(client_fn=...)."""
    app = fl.client.ClientApp()
    with pytest.raises(NotImplementedError, match=r"ClientApp\(client_fn=...\)"):
        getattr(app, name)()


def test_server_app_main_and_driver_raise_not_implemented() -> None:
    """@app.main() and Driver(): NotImplementedError naming server_fn."""
    with pytest.raises(NotImplementedError, match="server_fn"):
        fl.server.ServerApp().main()
    with pytest.raises(NotImplementedError, match="server_fn"):
        fl.server.Driver()


def test_server_app_components_and_server_fn() -> None:
    """Given components are returned as such; server_fn is called with the context;
    both at once is a ValueError (as in Flower)."""
    strategy = FedAvg()
    app = ServerApp(config=ServerConfig(num_rounds=2), strategy=strategy)
    components = app.components(_context())
    assert components == ServerAppComponents(config=ServerConfig(num_rounds=2), strategy=strategy)
    assert ServerAppComponents() == ServerAppComponents(None, None, None, None)
    contexts: list[Context] = []

    def server_fn(context: Context) -> ServerAppComponents:
        contexts.append(context)
        return ServerAppComponents(strategy=strategy)

    assert ServerApp(server_fn=server_fn).components(_context(0)).strategy is strategy
    assert len(contexts) == 1
    with pytest.raises(ValueError, match="received both server_fn and strategy"):
        ServerApp(strategy=strategy, server_fn=server_fn)
    with pytest.raises(ConfigError, match="expected it to return a ServerAppComponents"):
        ServerApp(server_fn=lambda context: strategy).components(_context())  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="strategy: expected a Strategy or None, received str"):
        ServerApp(strategy="FedAvg")  # type: ignore[arg-type]


def test_start_numpy_client_forwards_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """start_numpy_client calls start_client with client.to_client() and the same
    keywords, and logs a deprecation WARNING once per process (Flower logs it, too)."""
    forwarded: list[dict[str, Any]] = []
    monkeypatch.setattr(
        start_numpy_client_module, "start_client", lambda **kw: forwarded.append(kw)
    )
    monkeypatch.setattr(start_numpy_client_module, "_warned", threading.Event())
    client = AddClient()
    with caplog.at_level(logging.WARNING, logger="stamen"):
        for _ in range(2):
            fl.client.start_numpy_client(
                server_address="127.0.0.1:1", client=client, insecure=True, transport="rest"
            )
    deprecations = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(deprecations) == 1
    assert "start_client" in deprecations[0].getMessage()
    assert len(forwarded) == 2
    call = forwarded[0]
    assert isinstance(call["client"], fl.client.Client)
    assert (call["insecure"], call["transport"], call["root_certificates"]) == (True, "rest", None)
    assert call["grpc_max_message_length"] == 536_870_912
    with pytest.raises(ConfigError, match="expected a NumPyClient"):
        fl.client.start_numpy_client(server_address="127.0.0.1:1", client=client.to_client())  # type: ignore[arg-type]


def test_fixed_and_adaptive_clipping_mods_clip_the_update() -> None:
    """fixedclipping_mod clips the fit update to config["clipping_norm"] (L2 over all
    arrays); adaptiveclipping_mod also reports norm_bit; other messages pass through."""
    from stamen.client.mod import adaptiveclipping_mod, fixedclipping_mod

    ins = FitIns(FIT_INS.parameters, {"lr": 1.0, "clipping_norm": 1.0})
    fixed = fl.client.ClientApp(client_fn=client_fn, mods=[fixedclipping_mod])
    reply = handle(fixed.to_client_fn(), _context(), ins)
    assert isinstance(reply, FitRes)
    update = parameters_to_ndarrays(reply.parameters)[0]
    assert float(np.linalg.norm(update)) == pytest.approx(1.0, rel=1e-5)
    assert "norm_bit" not in reply.metrics
    adaptive = fl.client.ClientApp(client_fn=client_fn, mods=[adaptiveclipping_mod])
    reply = handle(adaptive.to_client_fn(), _context(), ins)
    assert isinstance(reply, FitRes)
    assert reply.metrics["norm_bit"] is True
    evaluated = handle(adaptive.to_client_fn(), _context(), EvaluateIns(FIT_INS.parameters, {}))
    assert isinstance(evaluated, EvaluateRes) and evaluated.status.code == Code.OK
    missing = handle(fixed.to_client_fn(), _context(), FIT_INS)
    assert isinstance(missing, FitRes)
    assert missing.status.code == Code.CLIENT_ERROR
    assert "clipping_norm" in missing.status.message


def test_size_mods_log_and_pass_through(caplog: pytest.LogCaptureFixture) -> None:
    """message_size_mod and parameters_size_mod log sizes at INFO; the reply is unchanged."""
    from stamen.client.mod import message_size_mod, parameters_size_mod

    app = fl.client.ClientApp(client_fn=client_fn, mods=[message_size_mod, parameters_size_mod])
    with caplog.at_level(logging.INFO, logger="stamen"):
        reply = handle(app.to_client_fn(), _context(), FIT_INS)
    assert isinstance(reply, FitRes) and reply.status.code == Code.OK
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("message size: ") for m in messages)
    assert any(m.startswith("parameters: 1 array(s), ") for m in messages)


def test_flowers_secaggplus_mod_is_accepted_and_passes_messages_on() -> None:
    """A ClientApp written for Flower with ``mods=[secaggplus_mod]`` runs: the mod passes
    each message on unchanged (Stamen nodes take part in SecAgg+ by themselves)."""
    from stamen.client.mod import secagg_mod, secaggplus_mod

    seen: list[object] = []

    def call_next(msg: object, context: object) -> object:
        seen.append(msg)
        return "reply"

    message, context = object(), object()
    assert secaggplus_mod(message, context, call_next) == "reply"  # type: ignore[arg-type]
    assert secagg_mod is secaggplus_mod
    assert seen == [message]
