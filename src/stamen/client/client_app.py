"""``ClientApp``: Flower 1.12's app object for a client node, with optional mods.

``ClientApp(client_fn=client_fn)`` runs where Flower's does: in a simulation
(:func:`stamen.simulation.run_simulation`), as a node (``stamen node module:app``), or
through :func:`stamen.client.start_client` (``client_fn=app.to_client_fn()``).

Without mods the app is its ``client_fn``: a node runs it exactly as
``start_client(client_fn=...)`` does. With mods, every instruction becomes a
:class:`~stamen.message.Message` holding Flower's legacy records
(:mod:`stamen.recordset_compat`), runs through the mods to the client and back, and the
reply is converted back: what a mod changes is what the client receives and what the
server gets.

Flower's low-level Message API (``@app.train()``, ``@app.evaluate()``, ``@app.query()``)
is not supported: it raises :class:`NotImplementedError` naming what to use instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from ..context import Context
from ..errors import ClientAppError, ConfigError
from ..message import DEFAULT_TTL, Message, MessageType, MessageTypeLegacy, Metadata
from ..messages import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Reply,
)
from ..records import RecordSet
from ..recordset_compat import (
    evaluateins_to_recordset,
    evaluateres_to_recordset,
    fitins_to_recordset,
    fitres_to_recordset,
    getparametersins_to_recordset,
    getparametersres_to_recordset,
    getpropertiesins_to_recordset,
    getpropertiesres_to_recordset,
    recordset_to_evaluateins,
    recordset_to_evaluateres,
    recordset_to_fitins,
    recordset_to_fitres,
    recordset_to_getparametersins,
    recordset_to_getparametersres,
    recordset_to_getpropertiesins,
    recordset_to_getpropertiesres,
)
from ..typing import UserConfig
from .client import Client
from .dispatch import ClientFn, call_client, normalize_client_fn
from .mod import ClientAppCallable, Mod, make_ffn

__all__ = ["ClientApp", "ClientFnExt", "instruction_to_message", "message_to_reply"]

ClientFnExt: TypeAlias = Callable[[Context], Client]
"""``client_fn(context) -> Client`` (Flower's name; Stamen's ``ClientFn`` is the same)."""


def _unsupported(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"ClientApp.{name}(): Flower's low-level Message API is not supported by Stamen. "
        "Use ClientApp(client_fn=...) with a Client or NumPyClient (and mods=[...] to act "
        "on each message)."
    )


_MESSAGE_TYPES: dict[type, str] = {
    FitIns: MessageType.TRAIN,
    EvaluateIns: MessageType.EVALUATE,
    GetParametersIns: MessageTypeLegacy.GET_PARAMETERS,
    GetPropertiesIns: MessageTypeLegacy.GET_PROPERTIES,
}


def _instruction_records(instruction: Instruction) -> RecordSet:
    if isinstance(instruction, FitIns):
        return fitins_to_recordset(instruction, keep_input=True)
    if isinstance(instruction, EvaluateIns):
        return evaluateins_to_recordset(instruction, keep_input=True)
    if isinstance(instruction, GetParametersIns):
        return getparametersins_to_recordset(instruction)
    if isinstance(instruction, GetPropertiesIns):
        return getpropertiesins_to_recordset(instruction)
    raise ConfigError(
        f"ClientApp: expected FitIns, EvaluateIns, GetParametersIns or GetPropertiesIns, "
        f"received {type(instruction).__name__}"
    )


def instruction_to_message(instruction: Instruction, context: Context) -> Message:
    """``instruction`` as the Message a Flower 1.12 node hands its ClientApp.

    Metadata as on Flower's grpc-bidi path: ``run_id=0``, a fresh ``message_id``,
    ``src_node_id=0`` (the server), ``dst_node_id=context.node_id``, ``group_id=""``,
    ``ttl=DEFAULT_TTL``, and the message type (``train``, ``evaluate``,
    ``get_parameters``, ``get_properties``).
    """
    content = _instruction_records(instruction)
    metadata = Metadata(
        run_id=0,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=context.node_id,
        reply_to_message="",
        group_id="",
        ttl=DEFAULT_TTL,
        message_type=_MESSAGE_TYPES[type(instruction)],
    )
    return Message(metadata=metadata, content=content)


def _message_to_instruction(message: Message) -> Instruction:
    kind = message.metadata.message_type
    content = message.content
    if kind == MessageType.TRAIN:
        return recordset_to_fitins(content, keep_input=True)
    if kind == MessageType.EVALUATE:
        return recordset_to_evaluateins(content, keep_input=True)
    if kind == MessageTypeLegacy.GET_PARAMETERS:
        return recordset_to_getparametersins(content)
    if kind == MessageTypeLegacy.GET_PROPERTIES:
        return recordset_to_getpropertiesins(content)
    raise ValueError(
        f"ClientApp: expected a message of type train, evaluate, get_parameters or "
        f"get_properties, received {kind!r}"
    )


def _reply_records(reply: Reply) -> RecordSet:
    if isinstance(reply, FitRes):
        return fitres_to_recordset(reply, keep_input=True)
    if isinstance(reply, EvaluateRes):
        return evaluateres_to_recordset(reply)
    if isinstance(reply, GetParametersRes):
        return getparametersres_to_recordset(reply, keep_input=True)
    if isinstance(reply, GetPropertiesRes):
        return getpropertiesres_to_recordset(reply)
    raise TypeError(f"ClientApp: no records for a {type(reply).__name__}")


def message_to_reply(message: Message, expected: type) -> Reply:
    """The classic reply of type ``expected`` that ``message`` (a ClientApp's reply) holds.

    Raises:
        ClientAppError: the message carries an error.
        KeyError: a record of the reply is missing.
    """
    if message.has_error():
        error = message.error
        raise ClientAppError(f"ClientApp replied with error {error.code}: {error.reason}")
    content = message.content
    if expected is FitRes:
        return recordset_to_fitres(content, keep_input=True)
    if expected is EvaluateRes:
        return recordset_to_evaluateres(content)
    if expected is GetParametersRes:
        return recordset_to_getparametersres(content, keep_input=True)
    if expected is GetPropertiesRes:
        return recordset_to_getpropertiesres(content)
    raise TypeError(f"ClientApp: expected a reply type, received {expected!r}")


class ClientApp:
    """A client node's application: how to build its client, and mods around each message.

    Args:
        client_fn: ``client_fn(context) -> Client`` (or a NumPyClient, converted with a
            warning; the legacy ``client_fn(cid: str)`` works with a DeprecationWarning).
            Called once per message; ``context.state`` is what persists.
        mods: Functions ``mod(msg, context, call_next) -> Message`` run around every
            message, the first outermost (see :mod:`stamen.client.mod`).

    Raises:
        ConfigError: ``client_fn`` is not a one-argument callable, or a mod is not callable.
    """

    def __init__(
        self,
        client_fn: Callable[..., Any] | None = None,
        mods: Sequence[Mod] | None = None,
    ) -> None:
        self._client_fn: ClientFn | None = (
            None if client_fn is None else normalize_client_fn(client_fn)
        )
        if mods is not None and (isinstance(mods, str) or not isinstance(mods, Sequence)):
            raise ConfigError(f"mods: expected a list of mods, received {type(mods).__name__}")
        self._mods: list[Mod] = list(mods or [])
        for index, mod in enumerate(self._mods):
            if not callable(mod):
                raise ConfigError(
                    f"mods[{index}]: expected a callable mod(msg, context, call_next), "
                    f"received {type(mod).__name__}"
                )
        self._handler: ClientAppCallable = make_ffn(self._run_client, self._mods)

    @property
    def mods(self) -> list[Mod]:
        """The mods, outermost first."""
        return list(self._mods)

    def _require_client_fn(self) -> ClientFn:
        if self._client_fn is None:
            raise ConfigError(
                "ClientApp: expected a client_fn, received ClientApp(client_fn=None); Stamen "
                "runs ClientApps built with client_fn (Flower's @app.train()/@app.evaluate()/"
                "@app.query() Message API is not supported)"
            )
        return self._client_fn

    def _run_client(self, message: Message, context: Context) -> Message:
        """The innermost step: the message's instruction, run on a fresh client."""
        instruction = _message_to_instruction(message)
        reply = call_client(self._require_client_fn(), context, instruction)
        return message.create_reply(_reply_records(reply))

    def __call__(self, message: Message, context: Context) -> Message:
        """Handle ``message``: through the mods to a client built by ``client_fn``.

        Raises:
            ConfigError: the app has no ``client_fn``.
            ValueError: an unknown message type (``query`` included).
            Exception: whatever a mod or the client raised.
        """
        self._require_client_fn()
        return self._handler(message, context)

    def to_client_fn(self, node_config: UserConfig | None = None) -> ClientFn:
        """The ``client_fn`` a node runs for this app (Stamen).

        Without mods, ``client_fn`` itself: a node runs it exactly as
        ``start_client(client_fn=...)`` does. With mods, a function building a
        :class:`Client` that runs each instruction through the mods.

        Args:
            node_config: Entries to add to ``context.node_config`` (what Flower's
                ``flower-supernode --node-config`` gives), unless the node already has them.

        Raises:
            ConfigError: the app has no ``client_fn``.
        """
        client_fn = self._require_client_fn()
        built: ClientFn = _ModsClientFn(self) if self._mods else client_fn
        if node_config:
            return _WithNodeConfig(built, dict(node_config))
        return built

    def train(self) -> Callable[[ClientAppCallable], ClientAppCallable]:
        """Not supported (Flower's Message API): raises NotImplementedError."""
        raise _unsupported("train")

    def evaluate(self) -> Callable[[ClientAppCallable], ClientAppCallable]:
        """Not supported (Flower's Message API): raises NotImplementedError."""
        raise _unsupported("evaluate")

    def query(self) -> Callable[[ClientAppCallable], ClientAppCallable]:
        """Not supported (Flower's Message API): raises NotImplementedError."""
        raise _unsupported("query")


class _WithNodeConfig:
    """A ``client_fn`` whose context's ``node_config`` gets fixed entries first."""

    def __init__(self, client_fn: ClientFn, node_config: UserConfig) -> None:
        self.client_fn = client_fn
        self.node_config = node_config

    def __call__(self, context: Context) -> Client:
        for key, value in self.node_config.items():
            context.node_config.setdefault(key, value)
        return self.client_fn(context)


class _ModsClientFn:
    """``client_fn`` of a ClientApp with mods: builds a :class:`_ModsClient` per message."""

    def __init__(self, app: ClientApp) -> None:
        self.app = app

    def __call__(self, context: Context) -> Client:
        return _ModsClient(self.app, context)


class _ModsClient(Client):
    """A Client whose every method runs the instruction through the app's mods."""

    def __init__(self, app: ClientApp, context: Context) -> None:
        self._app = app
        self._node_context = context

    def _run(self, instruction: Instruction, expected: type) -> Any:
        message = instruction_to_message(instruction, self._node_context)
        return message_to_reply(self._app(message, self._node_context), expected)

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Through the mods to the app's client."""
        reply: GetPropertiesRes = self._run(ins, GetPropertiesRes)
        return reply

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        """Through the mods to the app's client."""
        reply: GetParametersRes = self._run(ins, GetParametersRes)
        return reply

    def fit(self, ins: FitIns) -> FitRes:
        """Through the mods to the app's client."""
        reply: FitRes = self._run(ins, FitRes)
        return reply

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Through the mods to the app's client."""
        reply: EvaluateRes = self._run(ins, EvaluateRes)
        return reply
