"""The node's half of SecAgg+: answers the protocol's stages before user code sees them.

:func:`~stamen.client.dispatch.handle` hands every instruction to :func:`answer`. An
instruction whose config has ``stamen.secagg.stage`` (sent only by a server running
:class:`~stamen.server.strategy.SecAggPlus`) is a stage of the protocol:

* ``GetPropertiesIns`` carries SETUP, SHARE_KEYS and UNMASK; the node answers them itself
  (:class:`~stamen.protocol.secagg.SecAggNode`), the user's client is not called;
* ``FitIns`` carries COLLECT_MASKED: the node takes its neighbours' shares, runs the
  user's ``fit`` on the model with the config stripped of the reserved keys, and replies
  with the masked vector (one ``uint32`` array) in place of the trained model, with the
  user's ``num_examples`` and metrics.

Every other instruction goes to the user's client unchanged, so a NumPyClient takes part
with no change. The node's secrets live in ``context.state`` between stages (never sent).
A refused request (out of order, another round, a server asking for both shares of one
node) raises :class:`~stamen.errors.ProtocolError`, which ``handle`` turns into a
``CLIENT_ERROR`` reply.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..context import Context
from ..errors import ProtocolError
from ..messages import (
    Code,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Parameters,
    Reply,
    Status,
)
from ..ndarrays import TENSOR_TYPE, parameters_to_views, tensor_with_array
from ..protocol.secagg import KEY_PREFIX, KEY_STAGE, Request, SecAggNode
from ..records import ConfigsRecord

__all__ = ["STATE_RECORD", "answer"]

STATE_RECORD = "stamen.secagg"
"""The ``context.state.configs_records`` entry that holds the node's SecAgg+ state."""

_OK = Status(code=Code.OK, message="Success")


def _load(context: Context, rng: Callable[[int], bytes]) -> SecAggNode:
    record = context.state.configs_records.get(STATE_RECORD)
    if record is None:
        return SecAggNode(rng)
    text = record["state"]
    if not isinstance(text, str):
        raise ProtocolError("secagg: the node's saved state is corrupt")
    return SecAggNode.loads(text, rng)


def _save(context: Context, node: SecAggNode) -> None:
    context.state.configs_records[STATE_RECORD] = ConfigsRecord({"state": node.dumps()})


def answer(
    context: Context,
    instruction: Instruction,
    run: Callable[[Instruction], Reply],
    rng: Callable[[int], bytes] = os.urandom,
) -> Reply:
    """``run(instruction)`` (the user's client), unless ``instruction`` is a SecAgg+ stage,
    which the node answers as the module docstring says.

    Raises:
        ProtocolError: a stage the node refuses.
    """
    if not isinstance(instruction, GetPropertiesIns | FitIns) or KEY_STAGE not in (
        instruction.config
    ):
        return run(instruction)
    node = _load(context, rng)
    request = node.request_of(instruction.config)
    if isinstance(instruction, GetPropertiesIns):
        if request is Request.SETUP:
            properties = node.setup(instruction.config)
        elif request is Request.SHARE_KEYS:
            properties = node.share_keys(instruction.config)
        elif request is Request.UNMASK:
            properties = node.unmask(instruction.config)
        else:
            raise ProtocolError(f"secagg: {request.value} does not come as GetPropertiesIns")
        _save(context, node)
        return GetPropertiesRes(status=_OK, properties=properties)
    if request is not Request.COLLECT_MASKED:
        raise ProtocolError(f"secagg: {request.value} does not come as FitIns")
    node.begin_masked(instruction.config)
    _save(context, node)
    config = {k: v for k, v in instruction.config.items() if not k.startswith(KEY_PREFIX)}
    reply = run(FitIns(instruction.parameters, config))
    if not isinstance(reply, FitRes) or reply.status.code != Code.OK:
        return reply
    # Quantized and masked from read-only views of the trained model, straight into the
    # tensor that is sent: no copy of either.
    trained = parameters_to_views(reply.parameters)
    length = 1 + sum(int(array.size) for array in trained)
    tensor, vector = tensor_with_array((length,), np.dtype(np.uint32))
    node.mask(trained, reply.num_examples, out=vector)
    _save(context, node)
    return FitRes(
        status=_OK,
        parameters=Parameters(tensors=[tensor], tensor_type=TENSOR_TYPE),
        num_examples=reply.num_examples,
        metrics=reply.metrics,
    )
