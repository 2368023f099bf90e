"""Classic messages and task metadata as plain JSON, for comparing Flower's and Stamen's.

Imported by the Stamen tests (dev venv) and by ``flower_fleet_codec.py`` (Flower venv):
Flower's ``flwr.common`` FitIns/FitRes/... and Stamen's messages have the same class and
attribute names, so one function describes both. Scalars keep their types
(``[type name, value]``, bytes as hex), tensors are base64, status codes ints.
"""

from __future__ import annotations

import base64
from typing import Any

_MAPPINGS = ("config", "metrics", "properties")


def encode_scalar(value: Any) -> list[Any]:
    """``[type name, JSON value]``, so that 1, 1.0 and True stay distinct."""
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if type(value) in (bool, int, float, str):
        return [type(value).__name__, value]
    raise TypeError(f"not a Scalar: {value!r}")


def describe(message: Any) -> dict[str, Any]:
    """``{"kind": class name, field: JSON value, ...}`` of a classic Ins/Res message."""
    out: dict[str, Any] = {"kind": type(message).__name__}
    if hasattr(message, "status"):
        code = message.status.code
        out["status"] = [int(getattr(code, "value", code)), message.status.message]
    if hasattr(message, "parameters"):
        out["parameters"] = {
            "tensors": [
                base64.b64encode(bytes(t)).decode("ascii") for t in message.parameters.tensors
            ],
            "tensor_type": message.parameters.tensor_type,
        }
    if hasattr(message, "num_examples"):
        out["num_examples"] = message.num_examples
    if hasattr(message, "loss"):
        out["loss"] = (
            ["float", float(message.loss)] if type(message.loss) is float else repr(message.loss)
        )
    for name in _MAPPINGS:
        if hasattr(message, name):
            out[name] = {k: encode_scalar(v) for k, v in getattr(message, name).items()}
    return out


def describe_task(task_id: str, group_id: str, run_id: int, task: Any) -> dict[str, Any]:
    """The metadata of a TaskIns/TaskRes (the fields of Flower's ``Task`` but the content)."""
    return {
        "task_id": task_id,
        "group_id": group_id,
        "run_id": run_id,
        "producer": [task.producer.node_id, task.producer.anonymous],
        "consumer": [task.consumer.node_id, task.consumer.anonymous],
        "created_at": task.created_at,
        "delivered_at": task.delivered_at,
        "pushed_at": task.pushed_at,
        "ttl": task.ttl,
        "ancestry": list(task.ancestry),
        "task_type": task.task_type if hasattr(task, "task_type") else task.message_type,
    }
