"""Flower 1.12's own Fleet API serde and legacy conversion, for the codec interop tests
(run only by the Flower venv's python).

Usage:
  ``flower_fleet_codec.py decode-ins FILE``: FILE holds a ``PullTaskInsResponse``; each
  TaskIns goes through Flower's ``message_from_taskins`` and ``recordset_to_*ins``
  (what a Flower SuperNode does), and one JSON line ``[{"meta": ..., "message": ...}]``
  is printed (``legacy_forms``).
  ``flower_fleet_codec.py decode-res FILE``: the same for a ``PushTaskResRequest``
  (``message_from_taskres`` and ``recordset_to_*res``, what Flower's legacy server does);
  a TaskRes with an error gives ``{"meta": ..., "error": [code, reason]}``.
  ``flower_fleet_codec.py encode-ins FILE`` / ``encode-res FILE``: Flower builds the
  messages of :func:`instructions` / :func:`replies` with ``*_to_recordset`` and
  ``message_to_taskins`` / ``message_to_taskres`` (what a SuperLink / SuperNode sends),
  writes the ``PullTaskInsResponse`` / ``PushTaskResRequest`` bytes to FILE and prints
  their JSON form as above.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import legacy_forms
import numpy as np
from flwr.common import Error, Message, Metadata, serde
from flwr.common import recordset_compat as compat
from flwr.common import typing as t
from flwr.proto import fleet_pb2, node_pb2

NODE_ID = 2**64 - 7
RUN_ID = 2**63 + 5

SCALARS: dict[str, Any] = {
    "b": True,
    "f": False,
    "i": -(2**63),
    "u": 2**64 - 1,
    "zero": 0,
    "x": -0.375,
    "s": "fl\u00fc\u2713",
    "y": b"\x00\xff\x10",
    "e": b"",
}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def parameters() -> t.Parameters:
    return t.Parameters(
        tensors=[
            npy(np.arange(6, dtype=np.float32).reshape(2, 3) / 4),
            npy(np.array([-1, 2**40], dtype=np.int64)),
            npy(np.array(3.5, dtype=np.float64)),
        ],
        tensor_type="numpy.ndarray",
    )


def instructions() -> list[tuple[str, Any]]:
    """What Flower's legacy server sends, with every Scalar kind and empty parameters."""
    return [
        ("train", t.FitIns(parameters(), dict(SCALARS))),
        ("evaluate", t.EvaluateIns(parameters(), {"round": 3})),
        ("train", t.FitIns(t.Parameters([], "numpy.ndarray"), {})),
        ("get_parameters", t.GetParametersIns(dict(SCALARS))),
        ("get_properties", t.GetPropertiesIns({})),
    ]


def replies() -> list[tuple[str, Any]]:
    """What Flower's nodes answer, with every Scalar kind, each status code and a loss that
    float32 cannot hold."""
    ok = t.Status(t.Code.OK, "Success")
    return [
        ("train", t.FitRes(ok, parameters(), 7, dict(SCALARS))),
        (
            "train",
            t.FitRes(t.Status(t.Code.FIT_NOT_IMPLEMENTED, "no fit"), t.Parameters([], ""), 0, {}),
        ),
        ("evaluate", t.EvaluateRes(ok, 0.1, 2**62, dict(SCALARS))),
        ("evaluate", t.EvaluateRes(t.Status(t.Code.EVALUATE_NOT_IMPLEMENTED, "x"), 0.0, 0, {})),
        ("get_parameters", t.GetParametersRes(ok, parameters())),
        (
            "get_parameters",
            t.GetParametersRes(
                t.Status(t.Code.GET_PARAMETERS_NOT_IMPLEMENTED, ""),
                t.Parameters([], "numpy.ndarray"),
            ),
        ),
        ("get_properties", t.GetPropertiesRes(ok, dict(SCALARS))),
        (
            "get_properties",
            t.GetPropertiesRes(t.Status(t.Code.GET_PROPERTIES_NOT_IMPLEMENTED, "p"), {}),
        ),
    ]


TO_RECORDSET = {
    "FitIns": lambda m: compat.fitins_to_recordset(m, keep_input=True),
    "EvaluateIns": lambda m: compat.evaluateins_to_recordset(m, keep_input=True),
    "GetParametersIns": compat.getparametersins_to_recordset,
    "GetPropertiesIns": compat.getpropertiesins_to_recordset,
    "FitRes": lambda m: compat.fitres_to_recordset(m, keep_input=True),
    "EvaluateRes": compat.evaluateres_to_recordset,
    "GetParametersRes": lambda m: compat.getparametersres_to_recordset(m, keep_input=True),
    "GetPropertiesRes": compat.getpropertiesres_to_recordset,
}

INS_FROM_RECORDSET = {
    "train": lambda rs: compat.recordset_to_fitins(rs, keep_input=False),
    "evaluate": lambda rs: compat.recordset_to_evaluateins(rs, keep_input=False),
    "get_parameters": compat.recordset_to_getparametersins,
    "get_properties": compat.recordset_to_getpropertiesins,
}

RES_FROM_RECORDSET = {
    "train": lambda rs: compat.recordset_to_fitres(rs, keep_input=False),
    "evaluate": compat.recordset_to_evaluateres,
    "get_parameters": lambda rs: compat.recordset_to_getparametersres(rs, keep_input=False),
    "get_properties": compat.recordset_to_getpropertiesres,
}


def meta_of(task: Any) -> dict[str, Any]:
    return legacy_forms.describe_task(task.task_id, task.group_id, task.run_id, task.task)


def decode_ins(path: str) -> list[dict[str, Any]]:
    response = fleet_pb2.PullTaskInsResponse()
    with open(path, "rb") as file:
        response.ParseFromString(file.read())
    out = []
    for task_ins in response.task_ins_list:
        message = serde.message_from_taskins(task_ins)
        convert = INS_FROM_RECORDSET[message.metadata.message_type]
        out.append(
            {"meta": meta_of(task_ins), "message": legacy_forms.describe(convert(message.content))}
        )
    return out


def decode_res(path: str) -> list[dict[str, Any]]:
    request = fleet_pb2.PushTaskResRequest()
    with open(path, "rb") as file:
        request.ParseFromString(file.read())
    out = []
    for task_res in request.task_res_list:
        message = serde.message_from_taskres(task_res)
        item: dict[str, Any] = {"meta": meta_of(task_res)}
        if message.has_error():
            item["error"] = [message.error.code, message.error.reason]
        else:
            convert = RES_FROM_RECORDSET[message.metadata.message_type]
            item["message"] = legacy_forms.describe(convert(message.content))
        out.append(item)
    return out


def encode_ins(path: str) -> list[dict[str, Any]]:
    response = fleet_pb2.PullTaskInsResponse()
    out = []
    for index, (message_type, ins) in enumerate(instructions()):
        metadata = Metadata(
            run_id=RUN_ID,
            message_id="",
            src_node_id=0,
            dst_node_id=NODE_ID,
            reply_to_message="",
            group_id=str(index + 1),
            ttl=3600.0 + index,
            message_type=message_type,
        )
        task_ins = serde.message_to_taskins(
            Message(metadata, TO_RECORDSET[type(ins).__name__](ins))
        )
        task_ins.task_id = f"ins-{index}"  # the SuperLink gives each TaskIns its id
        response.task_ins_list.append(task_ins)
        out.append({"meta": meta_of(task_ins), "message": legacy_forms.describe(ins)})
    with open(path, "wb") as file:
        file.write(response.SerializeToString())
    return out


def encode_res(path: str) -> list[dict[str, Any]]:
    request = fleet_pb2.PushTaskResRequest(node=node_pb2.Node(node_id=NODE_ID))
    out = []
    cases: list[tuple[str, Any]] = [*replies(), ("train", None)]
    for index, (message_type, res) in enumerate(cases):
        metadata = Metadata(
            run_id=RUN_ID,
            message_id="",
            src_node_id=NODE_ID,
            dst_node_id=0,
            reply_to_message=f"ins-{index}",
            group_id=str(index + 1),
            ttl=60.0,
            message_type=message_type,
        )
        item: dict[str, Any] = {}
        if res is None:  # what a SuperNode whose ClientApp raised sends
            error = Error(code=2, reason="ValueError: boom")
            message = Message(metadata, error=error)
            item["error"] = [2, "ValueError: boom"]
        else:
            message = Message(metadata, TO_RECORDSET[type(res).__name__](res))
            item["message"] = legacy_forms.describe(res)
        task_res = serde.message_to_taskres(message)
        request.task_res_list.append(task_res)
        out.append({"meta": meta_of(task_res), **item})
    with open(path, "wb") as file:
        file.write(request.SerializeToString())
    return out


def main() -> int:
    import json

    command, path = sys.argv[1], sys.argv[2]
    handlers = {
        "decode-ins": decode_ins,
        "decode-res": decode_res,
        "encode-ins": encode_ins,
        "encode-res": encode_res,
    }
    print(json.dumps(handlers[command](path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
