"""The one place where user code is called: build the client, run the instruction.

Whatever the transport (or a simulation), an instruction reaches user code only through
:func:`handle`. An exception in ``client_fn`` or in the client's method does not escape:
it becomes a reply with status ``CLIENT_ERROR`` naming the error, which the server counts
as a failure, and the node goes on serving.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

from ..context import Context
from ..errors import ConfigError
from ..messages import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Parameters,
    ReconnectIns,
    Reply,
    Status,
)
from .client import Client
from .numpy_client import NumPyClient, NumPyClientAdapter

__all__ = ["ClientFn", "call_client", "error_reply", "handle", "normalize_client_fn"]

logger = logging.getLogger("stamen.client")

ClientFn = Callable[[Context], Client]


def _as_client(built: object) -> Client:
    if isinstance(built, Client):
        return built
    if isinstance(built, NumPyClient):
        logger.warning(
            "client_fn returned a NumPyClient; converting it with .to_client(). "
            "Return `YourClient().to_client()` to silence this warning."
        )
        return built.to_client()
    raise TypeError(
        f"client_fn: expected it to return a Client or NumPyClient, received {type(built).__name__}"
    )


def normalize_client_fn(client_fn: Callable[..., Any]) -> ClientFn:
    """Accept ``client_fn(context)`` or the legacy ``client_fn(cid: str)``.

    A one-parameter function whose parameter is named ``cid`` or annotated ``str`` gets the
    partition id (or the node id) as a string, with a DeprecationWarning, as in Flower.

    Raises:
        ConfigError: ``client_fn`` is not callable with exactly one positional argument.
    """
    if not callable(client_fn):
        raise ConfigError(f"client_fn: expected a callable, received {type(client_fn).__name__}")
    try:
        params = list(inspect.signature(client_fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return client_fn
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) != 1:
        raise ConfigError(
            f"client_fn: expected a function of one argument (context: Context), received "
            f"one of {len(positional)} required positional arguments {[p.name for p in positional]}"
        )
    legacy = positional[0].name == "cid" or positional[0].annotation in (str, "str")
    if not legacy:
        return client_fn

    def from_context(context: Context) -> Client:
        warnings.warn(
            "client_fn(cid: str) is deprecated: write client_fn(context: Context) and read "
            "context.node_config['partition-id'] or context.node_id",
            DeprecationWarning,
            stacklevel=2,
        )
        cid = context.node_config.get("partition-id", context.node_id)
        built: Client = client_fn(str(cid))
        return built

    return from_context


def error_reply(instruction: Instruction, message: str) -> Reply:
    """The reply that reports a failure to handle ``instruction``."""
    status = Status(code=Code.CLIENT_ERROR, message=message)
    empty = Parameters(tensors=[], tensor_type="")
    if isinstance(instruction, FitIns):
        return FitRes(status=status, parameters=empty, num_examples=0, metrics={})
    if isinstance(instruction, EvaluateIns):
        return EvaluateRes(status=status, loss=0.0, num_examples=0, metrics={})
    if isinstance(instruction, GetParametersIns):
        return GetParametersRes(status=status, parameters=empty)
    if isinstance(instruction, GetPropertiesIns):
        return GetPropertiesRes(status=status, properties={})
    raise ConfigError(f"no error reply exists for {type(instruction).__name__}")


def _call(client: Client, instruction: Instruction) -> Reply:
    if isinstance(instruction, FitIns):
        return client.fit(instruction)
    if isinstance(instruction, EvaluateIns):
        return client.evaluate(instruction)
    if isinstance(instruction, GetParametersIns):
        return client.get_parameters(instruction)
    if isinstance(instruction, GetPropertiesIns):
        return client.get_properties(instruction)
    raise ConfigError(f"dispatch: {type(instruction).__name__} is not handled by a client")


_EXPECTED: dict[type, tuple[str, type]] = {
    FitIns: ("fit", FitRes),
    EvaluateIns: ("evaluate", EvaluateRes),
    GetParametersIns: ("get_parameters", GetParametersRes),
    GetPropertiesIns: ("get_properties", GetPropertiesRes),
}


def handle(
    client_fn: ClientFn, context: Context, instruction: Instruction, *, owned: bool = False
) -> Reply:
    """Build a client with ``client_fn(context)`` and run ``instruction`` on it.

    ``client_fn`` is called once per instruction, as in Flower; ``context.state`` is what
    persists. Never raises for errors of user code: they become a ``CLIENT_ERROR`` reply.

    ``owned=True``: the caller received ``instruction`` from the network and reads none
    of its parameters afterwards. A NumPyClient then trains on arrays over the received
    bytes instead of copies of them (the node holds the model once, not twice).
    """
    if isinstance(instruction, ReconnectIns):
        raise ConfigError("dispatch: ReconnectIns is handled by the node session, not a client")
    stage = "client_fn"
    try:
        client = _as_client(client_fn(context))
        client.set_context(context)
        stage, expected = _EXPECTED[type(instruction)]
        if owned and type(client) is NumPyClientAdapter:
            # Only our adapter itself: a Client of the user's (a subclass included) may
            # read ins.parameters after the fit.
            client.owns_instructions = True
            try:
                reply = _call(client, instruction)
            finally:
                client.owns_instructions = False
        else:
            reply = _call(client, instruction)
        if not isinstance(reply, expected):
            raise TypeError(
                f"{stage}: expected the client to return {expected.__name__}, "
                f"received {type(reply).__name__}"
            )
        return reply
    except Exception as exc:  # user code: report, keep the node serving
        logger.exception("client failed in %s", stage)
        return error_reply(instruction, f"{stage} raised {type(exc).__name__}: {exc}")


def call_client(client_fn: ClientFn, context: Context, instruction: Instruction) -> Reply:
    """Build a client with ``client_fn(context)`` and run ``instruction`` on it; raise.

    What :func:`handle` does, minus turning errors into replies: the innermost step of
    client mods (:class:`~stamen.client.ClientApp`), whose exceptions travel out through
    the mods, as in Flower, and become a ``CLIENT_ERROR`` reply in :func:`handle`.

    Raises:
        Exception: whatever ``client_fn`` or the client's method raised; TypeError if the
            method returned the wrong type of reply.
    """
    client = _as_client(client_fn(context))
    client.set_context(context)
    stage, expected = _EXPECTED[type(instruction)]
    reply = _call(client, instruction)
    if not isinstance(reply, expected):
        raise TypeError(
            f"{stage}: expected the client to return {expected.__name__}, "
            f"received {type(reply).__name__}"
        )
    return reply
