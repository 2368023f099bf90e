"""Stamen's Flower Fleet codec and Flower 1.12's own serde + legacy conversion agree.

Both directions of both task kinds, through real Flower in its venv
(``peers/flower_fleet_codec.py``): Stamen encodes TaskIns / TaskRes that Flower decodes
with ``message_from_taskins``/``message_from_taskres`` and ``recordset_to_*`` (what a
SuperNode / Flower's legacy server do), and Stamen decodes the TaskIns / TaskRes that
Flower builds with ``*_to_recordset`` and ``message_to_task*``. Every Scalar kind, empty
and 0-d tensors, each status code and a loss float32 cannot hold are covered; messages
and task metadata are compared in one JSON form (``peers/legacy_forms.py``).
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
    Status,
)
from stamen.protocol.flower_fleet import (
    ANONYMOUS,
    FlowerError,
    Node,
    PullTaskInsResponse,
    PushTaskResRequest,
    TaskIns,
    TaskMeta,
    TaskRes,
    UnreadableTask,
    message_type_of,
)
from stamen.wire import flower_codec

from ._harness import PEERS, flower_python, peer_env
from .peers import legacy_forms

pytestmark = pytest.mark.interop

NODE = Node(node_id=2**64 - 7)
RUN_ID = 2**63 + 5
SCALARS: dict[str, Any] = {
    "b": True,
    "f": False,
    "i": -(2**63),
    "u": 2**64 - 1,
    "zero": 0,
    "x": -0.375,
    "s": "st\u00e4\u2713",
    "y": b"\x00\xff\x10",
    "e": b"",
}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _parameters() -> Parameters:
    return Parameters(
        tensors=[
            _npy(np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)),
            _npy(np.array([7, -(2**50)], dtype=np.int64)),
            _npy(np.array(True)),
        ],
        tensor_type="numpy.ndarray",
    )


def _flower(command: str, path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(flower_python()), str(PEERS / "flower_fleet_codec.py"), command, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=peer_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert isinstance(result, list)
    return result


def _meta(meta: TaskMeta) -> dict[str, Any]:
    return legacy_forms.describe_task(meta.task_id, meta.group_id, meta.run_id, meta)


def _describe(task: TaskIns | TaskRes | UnreadableTask) -> dict[str, Any]:
    assert not isinstance(task, UnreadableTask), task.reason
    item: dict[str, Any] = {"meta": _meta(task.meta)}
    if isinstance(task, TaskIns):
        item["message"] = legacy_forms.describe(task.instruction)
    elif task.error is not None:
        item["error"] = [task.error.code, task.error.reason]
    else:
        item["message"] = legacy_forms.describe(task.reply)
    return item


def _ins_meta(index: int, instruction: Any) -> TaskMeta:
    return TaskMeta(
        task_id=f"task-{index}",
        run_id=RUN_ID,
        message_type=message_type_of(instruction),
        group_id=str(index),
        producer=ANONYMOUS,
        consumer=NODE,
        created_at=1_700_000_000.25 + index,
        ttl=3600.0,
    )


def test_flower_reads_stamen_task_ins(tmp_path: Path) -> None:
    """A PullTaskInsResponse Stamen encodes (FitIns with .npy tensors and every Scalar kind
    in its config, EvaluateIns, FitIns with no tensors, GetParametersIns, GetPropertiesIns)
    is read by Flower 1.12's serde and legacy conversion as the same FitIns etc. with the
    same task metadata."""
    instructions = [
        FitIns(_parameters(), dict(SCALARS)),
        EvaluateIns(_parameters(), {"round": 2}),
        FitIns(Parameters([], "numpy.ndarray"), {}),
        GetParametersIns(dict(SCALARS)),
        GetPropertiesIns({"k": "v"}),
    ]
    tasks = [TaskIns(_ins_meta(i, ins), ins) for i, ins in enumerate(instructions)]
    path = tmp_path / "pull.bin"
    path.write_bytes(flower_codec.encode_pull_task_ins_response(PullTaskInsResponse(tuple(tasks))))
    assert _flower("decode-ins", path) == [_describe(t) for t in tasks]


def test_stamen_reads_flower_task_ins(tmp_path: Path) -> None:
    """The TaskIns Flower 1.12 builds from FitIns/EvaluateIns/GetParametersIns/
    GetPropertiesIns (every Scalar kind, no tensors, 0-d tensors) decode in Stamen to
    the same instructions, tensors kept as Flower's .npy bytes, with the same metadata."""
    path = tmp_path / "pull.bin"
    expected = _flower("encode-ins", path)
    response = flower_codec.decode_pull_task_ins_response(path.read_bytes())
    assert [_describe(t) for t in response.task_ins_list] == expected
    assert response.reconnect is None


def test_stamen_reads_flower_task_res(tmp_path: Path) -> None:
    """The TaskRes Flower 1.12 nodes build from FitRes/EvaluateRes/GetParametersRes/
    GetPropertiesRes (OK and each NOT_IMPLEMENTED code, every Scalar kind, a 64-bit loss)
    and the error TaskRes of a raising ClientApp decode in Stamen to the same replies and
    errors with the same metadata."""
    path = tmp_path / "push.bin"
    expected = _flower("encode-res", path)
    request = flower_codec.decode_push_task_res_request(path.read_bytes())
    assert request.node == NODE
    assert [_describe(t) for t in request.task_res_list] == expected
    losses = [
        t.reply.loss
        for t in request.task_res_list
        if isinstance(t, TaskRes) and isinstance(t.reply, EvaluateRes)
    ]
    assert losses[0] == 0.1  # a double: not rounded to float32 as on grpc-bidi


def test_flower_reads_stamen_task_res(tmp_path: Path) -> None:
    """A PushTaskResRequest Stamen encodes is read by Flower 1.12's legacy server as the
    same replies; a CLIENT_ERROR reply arrives with the NOT_IMPLEMENTED code Flower
    knows for its kind, its message kept; an error TaskRes arrives as Flower's Error."""
    ok = Status(Code.OK, "Success")
    failed = Status(Code.CLIENT_ERROR, "ValueError: boom")
    replies: list[Any] = [
        FitRes(ok, _parameters(), 7, dict(SCALARS)),
        FitRes(failed, Parameters([], ""), 0, {}),
        EvaluateRes(ok, 0.1, 2**62, dict(SCALARS)),
        EvaluateRes(failed, 0.0, 0, {}),
        GetParametersRes(ok, _parameters()),
        GetParametersRes(failed, Parameters([], "numpy.ndarray")),
        GetPropertiesRes(ok, dict(SCALARS)),
        GetPropertiesRes(failed, {}),
    ]
    tasks = [
        TaskRes(
            TaskMeta(
                task_id="",
                run_id=RUN_ID,
                message_type=message_type_of(reply),
                group_id=str(i),
                producer=NODE,
                consumer=ANONYMOUS,
                created_at=1_700_000_000.5,
                ttl=30.0,
                ancestry=(f"task-{i}",),
            ),
            reply=reply,
        )
        for i, reply in enumerate(replies)
    ]
    tasks.append(
        TaskRes(
            TaskMeta(task_id="", run_id=RUN_ID, message_type="train", producer=NODE),
            error=FlowerError(code=2, reason="boom"),
        )
    )
    path = tmp_path / "push.bin"
    path.write_bytes(
        flower_codec.encode_push_task_res_request(PushTaskResRequest(NODE, tuple(tasks)))
    )
    got = _flower("decode-res", path)
    expected = [_describe(t) for t in tasks]
    flower_codes = {
        "FitRes": int(Code.FIT_NOT_IMPLEMENTED),
        "EvaluateRes": int(Code.EVALUATE_NOT_IMPLEMENTED),
        "GetParametersRes": int(Code.GET_PARAMETERS_NOT_IMPLEMENTED),
        "GetPropertiesRes": int(Code.GET_PROPERTIES_NOT_IMPLEMENTED),
    }
    for item in expected:
        message = item.get("message")
        if message is not None and message["status"][0] == int(Code.CLIENT_ERROR):
            message["status"][0] = flower_codes[message["kind"]]
    assert got == expected
