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
    EXCHANGES,
    Code,
    EvaluateIns,
    FitIns,
    Instruction,
    ReconnectIns,
    Reply,
    Status,
    exchange_for,
)
from ..ndarrays import Lease
from .client import Client
from .numpy_client import NumPyClient
from .secagg import answer as secagg_answer

__all__ = ["ClientFn", "call_client", "error_reply", "handle", "normalize_client_fn", "received"]

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
    """The reply that reports a failure to handle ``instruction`` (``CLIENT_ERROR``).

    Raises:
        ConfigError: ``instruction`` has no such reply (``ReconnectIns``, not an instruction).
    """
    build = exchange_for(instruction).error_reply
    if build is None:
        raise ConfigError(f"no error reply exists for {type(instruction).__name__}")
    return build(Status(code=Code.CLIENT_ERROR, message=message))


def _call(client: Client, instruction: Instruction) -> Reply:
    method = exchange_for(instruction).method
    if method is None:
        raise ConfigError(f"dispatch: {type(instruction).__name__} is not handled by a client")
    reply: Reply = getattr(client, method)(instruction)
    return reply


# (client method, reply class) per instruction a client handles: a view of EXCHANGES.
_EXPECTED: dict[type, tuple[str, type]] = {
    kind: (exchange.method, exchange.reply)
    for kind, exchange in EXCHANGES.items()
    if exchange.method is not None
}


def handle(
    client_fn: ClientFn, context: Context, instruction: Instruction, lease: Lease | None = None
) -> Reply:
    """Build a client with ``client_fn(context)`` and run ``instruction`` on it.

    ``client_fn`` is called once per instruction, as in Flower; ``context.state`` is what
    persists. The stages of secure aggregation (instructions whose config has
    ``stamen.secagg.stage``) are answered by :func:`stamen.client.secagg.answer` before
    user code, which sees only the training (a plain FitIns). Never raises for errors of
    user code: they become a ``CLIENT_ERROR`` reply.

    Args:
        client_fn: Builds the client.
        context: The node's context.
        instruction: What to run.
        lease: Given by the node that received ``instruction`` and hands it over whole
            (:meth:`~stamen.ndarrays.Lease.over` its tensors): a client that takes it
            (:class:`~stamen.client.numpy_client.TakesLease`, as Stamen's NumPyClient
            adapter does) gets it with the instruction, so the NumPyClient trains on
            arrays over the received bytes instead of copies (the node holds the model
            once, not twice). Any other client gets a plain call. The lease ends when the
            client returns.
    """
    if isinstance(instruction, ReconnectIns):
        raise ConfigError("dispatch: ReconnectIns is handled by the node session, not a client")
    stage = "client_fn"
    try:
        client = _as_client(client_fn(context))
        client.set_context(context)
        stage = _EXPECTED[type(instruction)][0]
        # SecAgg+ stages are answered by the node; the rest goes to the client as is.
        return secagg_answer(context, instruction, lambda ins: _answer(client, ins, lease))
    except Exception as exc:  # user code: report, keep the node serving
        logger.exception("client failed in %s", stage)
        return error_reply(instruction, f"{stage} raised {type(exc).__name__}: {exc}")
    finally:
        if lease is not None:
            lease.end()


def _answer(client: Client, instruction: Instruction, lease: Lease | None) -> Reply:
    """Run ``instruction`` on ``client`` (with ``lease``, if the client takes one); the
    reply, checked to be of the instruction's reply type.

    Raises:
        TypeError: the client returned another kind of reply.
    """
    stage, expected = _EXPECTED[type(instruction)]
    # TakesLease, asked by attribute: a runtime-checkable protocol's isinstance costs
    # 8-26 us, paid on every instruction of every node.
    take = getattr(client, "handle_received", None) if lease is not None else None
    reply: Reply = take(instruction, lease) if take is not None else _call(client, instruction)
    if not isinstance(reply, expected):
        raise TypeError(
            f"{stage}: expected the client to return {expected.__name__}, "
            f"received {type(reply).__name__}"
        )
    return reply


def received(instruction: Instruction) -> Lease:
    """The lease on the memory ``instruction`` lies in, for the node that received it and
    hands it over to :func:`handle` (it names the received buffers of the instruction's
    parameters; none for an instruction without parameters or received as bytes)."""
    if isinstance(instruction, FitIns | EvaluateIns):
        return Lease.over(instruction.parameters.tensors)
    return Lease()


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
    return _answer(client, instruction, None)
