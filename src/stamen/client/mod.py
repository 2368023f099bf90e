"""Client mods: functions that run around every message a :class:`ClientApp` handles.

A mod has Flower's signature ``mod(msg: Message, context: Context, call_next) -> Message``:
it may read or change the instruction (``msg.content``, Flower's legacy records such as
``fitins.parameters``), call ``call_next(msg, context)`` to run the rest of the chain and
the client, and read or change the reply before returning it::

    def clip_mod(msg, context, call_next):
        reply = call_next(msg, context)
        ...  # e.g. clip reply.content.parameters_records["fitres.parameters"]
        return reply

    app = fl.client.ClientApp(client_fn=client_fn, mods=[clip_mod])

The first mod of the list is the outermost. Mods run only for a ClientApp given mods; a
node without mods never builds a Message.

This module also has ready-made mods with Flower 1.12's names: :func:`fixedclipping_mod`
and :func:`adaptiveclipping_mod` (the client half of the
``DifferentialPrivacyClientSide*Clipping`` strategies), :func:`message_size_mod` and
:func:`parameters_size_mod` (log sizes), and :func:`make_ffn` (chain mods by hand).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeAlias

from ..context import Context
from ..errors import ConfigError
from ..message import Message, MessageType
from ..ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from ..privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_clip_model_update
from ..recordset_compat import (
    fitres_to_recordset,
    recordset_to_fitins,
    recordset_to_fitres,
)

__all__ = [
    "ClientAppCallable",
    "Mod",
    "adaptiveclipping_mod",
    "fixedclipping_mod",
    "make_ffn",
    "message_size_mod",
    "parameters_size_mod",
    "secagg_mod",
    "secaggplus_mod",
]

_logger = logging.getLogger("stamen.client")

ClientAppCallable: TypeAlias = Callable[[Message, Context], Message]
"""Handles a message: ``fn(msg, context) -> Message`` (what ``call_next`` is)."""

Mod: TypeAlias = Callable[[Message, Context, ClientAppCallable], Message]
"""A client mod: ``mod(msg, context, call_next) -> Message``."""


def make_ffn(ffn: ClientAppCallable, mods: list[Mod]) -> ClientAppCallable:
    """``ffn`` wrapped in ``mods``, the first mod outermost.

    Args:
        ffn: The innermost handler (the client).
        mods: The mods, outermost first.
    """
    for mod in reversed(mods):
        ffn = _wrap(mod, ffn)
    return ffn


def _wrap(mod: Mod, call_next: ClientAppCallable) -> ClientAppCallable:
    def wrapped(message: Message, context: Context) -> Message:
        return mod(message, context, call_next)

    return wrapped


def _clip(
    msg: Message, context: Context, call_next: ClientAppCallable, *, adaptive: bool
) -> Message:
    name = "adaptiveclipping_mod" if adaptive else "fixedclipping_mod"
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    fit_ins = recordset_to_fitins(msg.content, keep_input=True)
    if KEY_CLIPPING_NORM not in fit_ins.config:
        raise ConfigError(
            f"{name}: expected {KEY_CLIPPING_NORM!r} in the fit config (sent by the server's "
            f"DifferentialPrivacyClientSide*Clipping strategy), received keys "
            f"{sorted(fit_ins.config)}"
        )
    norm = fit_ins.config[KEY_CLIPPING_NORM]
    if isinstance(norm, bool) or not isinstance(norm, int | float) or not norm > 0:
        raise ConfigError(f"{name}: expected a clipping norm > 0, received {norm!r}")
    received = parameters_to_ndarrays(fit_ins.parameters)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    fit_res = recordset_to_fitres(reply.content, keep_input=True)
    trained = parameters_to_ndarrays(fit_res.parameters)
    if [a.shape for a in trained] != [a.shape for a in received]:
        raise ConfigError(
            f"{name}: to clip the update, the trained model must have the layers of the "
            f"received one, {[a.shape for a in received]}; received {[a.shape for a in trained]}"
        )
    clipped, norm_bit = compute_clip_model_update(trained, received, float(norm))
    metrics = dict(fit_res.metrics)
    if adaptive:
        metrics[KEY_NORM_BIT] = norm_bit
    clipped_res = type(fit_res)(
        status=fit_res.status,
        parameters=ndarrays_to_parameters(clipped),
        num_examples=fit_res.num_examples,
        metrics=metrics,
    )
    reply.content = fitres_to_recordset(clipped_res, keep_input=True)
    return reply


def fixedclipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the model update of a fit to ``config["clipping_norm"]`` (L2 over all arrays).

    The client half of ``DifferentialPrivacyClientSideFixedClipping``; other messages pass
    through unchanged.

    Raises:
        ConfigError: the fit config has no clipping norm > 0.
    """
    return _clip(msg, context, call_next, adaptive=False)


def adaptiveclipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """As :func:`fixedclipping_mod`, and report ``metrics["norm_bit"]`` (the update was
    scaled down). The client half of ``DifferentialPrivacyClientSideAdaptiveClipping``."""
    return _clip(msg, context, call_next, adaptive=True)


def message_size_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log (INFO) the bytes of the instruction's records, then pass it on."""
    content = msg.content
    size = sum(
        record.count_bytes()
        for records in (
            content.parameters_records,
            content.metrics_records,
            content.configs_records,
        )
        for record in records.values()
    )
    _logger.info("message size: %d bytes", size)
    return call_next(msg, context)


def parameters_size_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log (INFO) the number of arrays and bytes of the instruction's parameters."""
    records = msg.content.parameters_records.values()
    arrays = sum(len(record) for record in records)
    size = sum(record.count_bytes() for record in records)
    _logger.info("parameters: %d array(s), %d bytes", arrays, size)
    return call_next(msg, context)


def secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Accepted for Flower 1.12 code: passes every message on unchanged.

    A Stamen node takes part in SecAgg+ by itself, whatever its mods, when the server runs
    :class:`stamen.server.strategy.SecAggPlus` (docs/security.md); Flower's SecAgg+ needs
    this mod on the node and a workflow on the server's Driver, which Stamen does not have.
    """
    return call_next(msg, context)


secagg_mod = secaggplus_mod
"""Flower's ``secagg_mod`` (SecAgg, the special case of SecAgg+): the same pass-through."""
