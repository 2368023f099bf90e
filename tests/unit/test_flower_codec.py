"""Flower Fleet API codec and dataclasses: what Stamen refuses, and how it says so."""

from __future__ import annotations

import io

import numpy as np
import pytest

from stamen.errors import ConfigError, DecodeError
from stamen.messages import (
    Code,
    DisconnectRes,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersRes,
    GetPropertiesRes,
    Parameters,
    ReconnectIns,
    Status,
)
from stamen.protocol import flower_fleet as ff
from stamen.wire import REST_PREFIX, FlowerCall, Verb
from stamen.wire import flower_codec as fc
from stamen.wire._pb import stamen_flower_fleet_pb2 as pb


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _pull_with_fit_array(
    array: pb.Array, message_type: str = "train"
) -> ff.TaskIns | ff.UnreadableTask:
    """Decode a PullTaskInsResponse holding one TaskIns whose fitins.parameters is ``array``."""
    response = pb.PullTaskInsResponse()
    task_ins = response.task_ins_list.add(task_id="t1", run_id=3)
    task_ins.task.task_type = message_type
    record = task_ins.task.recordset.parameters["fitins.parameters"]
    record.data_keys.append("0")
    record.data_values.append(array)
    task_ins.task.recordset.configs["fitins.config"].SetInParent()
    (task,) = fc.decode_pull_task_ins_response(response.SerializeToString()).task_ins_list
    return task


def _reason(task: ff.TaskIns | ff.UnreadableTask) -> str:
    assert isinstance(task, ff.UnreadableTask), task
    return task.reason


def test_npy_tensors_are_kept_as_received() -> None:
    """A .npy Array (dtype/shape stated as Flower's Array.from_numpy states them, or left
    empty as its legacy conversion does) becomes the same bytes in Stamen's Parameters."""
    data = _npy(np.arange(6, dtype=np.float32).reshape(2, 3))
    for dtype, shape in (("float32", [2, 3]), ("", [])):
        task = _pull_with_fit_array(
            pb.Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
        )
        assert isinstance(task, ff.TaskIns)
        assert isinstance(task.instruction, FitIns)
        assert task.instruction.parameters == Parameters([data], "numpy.ndarray")


@pytest.mark.parametrize(
    ("data", "dtype", "shape", "expected"),
    [
        (b"not npy at all", "", [], "expected .npy bytes"),
        (
            _npy(np.array([1, None], dtype=object), allow_pickle=True),
            "",
            [],
            "without Python objects",
        ),
        (_npy(np.zeros(4, np.int64))[:-1], "", [], "expected 160 bytes"),
        (_npy(np.zeros(4, np.int64)) + b"\0", "", [], "expected 160 bytes"),
        (_npy(np.zeros(4, np.int64)), "float32", [4], "the Array states dtype 'float32'"),
        (_npy(np.zeros(4, np.int64)), "int64", [2, 2], "shape (2, 2)"),
    ],
)
def test_bad_npy_tensors_make_the_task_unreadable(
    data: bytes, dtype: str, shape: list[int], expected: str
) -> None:
    """Bytes that are not .npy, a pickled object array (never unpickled), a size other
    than the header announces, or a dtype/shape that contradicts the header: the task is
    an UnreadableTask whose reason names what was expected and what was received."""
    task = _pull_with_fit_array(
        pb.Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
    )
    assert expected in _reason(task)
    assert "fitins.parameters['0']" in _reason(task)


def test_other_message_types_and_missing_records_are_unreadable() -> None:
    """A ``query`` task, or a ``train`` task without ``fitins.config``, or with a list
    value in it, is an UnreadableTask naming what it expected."""
    array = pb.Array(stype="numpy.ndarray", data=_npy(np.zeros(1)))
    assert "received 'query'" in _reason(_pull_with_fit_array(array, "query"))

    response = pb.PullTaskInsResponse()
    response.task_ins_list.add(task_id="t").task.task_type = "train"
    (task,) = fc.decode_pull_task_ins_response(response.SerializeToString()).task_ins_list
    assert "expected parameters record 'fitins.parameters'" in _reason(task)

    response = pb.PullTaskInsResponse()
    ins = response.task_ins_list.add(task_id="t")
    ins.task.task_type = "get_properties"
    ins.task.recordset.configs["getpropertiesins.config"].data["k"].sint_list.vals.append(1)
    (task,) = fc.decode_pull_task_ins_response(response.SerializeToString()).task_ins_list
    assert "received sint_list" in _reason(task)


def test_unknown_status_codes_and_missing_task_are_refused() -> None:
    """A FitRes whose status code Stamen does not know is an UnreadableTask; a TaskRes
    without a task and bytes that are not the message raise DecodeError."""
    request = pb.PushTaskResRequest()
    res = request.task_res_list.add(task_id="r")
    res.task.task_type = "get_properties"
    status = res.task.recordset.configs["getpropertiesres.status"]
    status.data["code"].sint64 = 42
    status.data["message"].string = ""
    res.task.recordset.configs["getpropertiesres.properties"].SetInParent()
    (task,) = fc.decode_push_task_res_request(request.SerializeToString()).task_res_list
    assert "received 42" in _reason(task)

    request = pb.PushTaskResRequest()
    request.task_res_list.add(task_id="r")
    with pytest.raises(DecodeError, match="expected a task, received none"):
        fc.decode_push_task_res_request(request.SerializeToString())
    with pytest.raises(DecodeError, match="invalid PushTaskResRequest"):
        fc.decode_push_task_res_request(b"\xff\xff")


def test_dataclasses_check_their_fields() -> None:
    """Tasks refuse a message type that is not their message's, messages with no Fleet form,
    and a TaskRes with both or neither of reply and error."""
    ins = FitIns(Parameters([], ""), {})
    with pytest.raises(ConfigError, match="expected 'train' for FitIns, received 'evaluate'"):
        ff.TaskIns(ff.TaskMeta("t", 1, "evaluate"), ins)
    with pytest.raises(ConfigError, match="received ReconnectIns"):
        ff.TaskIns(ff.TaskMeta("t", 1, "train"), ReconnectIns(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="exactly one of reply and error, received neither"):
        ff.TaskRes(ff.TaskMeta("t", 1, "train"))
    with pytest.raises(ConfigError, match=r"Node\.node_id: expected an int in"):
        ff.Node(-1)
    unreadable = ff.UnreadableTask(ff.TaskMeta("t", 1, "query"), "query")
    with pytest.raises(ConfigError, match="UnreadableTask"):
        fc.encode_pull_task_ins_response(ff.PullTaskInsResponse((unreadable,)))


def test_reply_for_flower_peer_maps_only_client_error() -> None:
    """CLIENT_ERROR becomes the NOT_IMPLEMENTED code of the reply's kind with the same
    message; every other code, and replies without a status, pass unchanged."""
    failed = Status(Code.CLIENT_ERROR, "ValueError: boom")
    empty = Parameters([], "")
    assert ff.reply_for_flower_peer(FitRes(failed, empty, 0)).status == Status(
        Code.FIT_NOT_IMPLEMENTED, "ValueError: boom"
    )
    assert (
        ff.reply_for_flower_peer(EvaluateRes(failed, 0.0, 0)).status.code
        is Code.EVALUATE_NOT_IMPLEMENTED
    )
    assert (
        ff.reply_for_flower_peer(GetParametersRes(failed, empty)).status.code
        is Code.GET_PARAMETERS_NOT_IMPLEMENTED
    )
    assert (
        ff.reply_for_flower_peer(GetPropertiesRes(failed, {})).status.code
        is Code.GET_PROPERTIES_NOT_IMPLEMENTED
    )
    ok = FitRes(Status(Code.OK, ""), empty, 3)
    assert ff.reply_for_flower_peer(ok) == ok
    disconnect = DisconnectRes("RECONNECT")
    assert ff.reply_for_flower_peer(disconnect) is disconnect


def test_flower_routes_are_flowers_and_never_stamens() -> None:
    """FlowerCall gives Flower 1.12's gRPC method paths and REST paths; none of Stamen's
    own REST paths equals one of them."""
    assert FlowerCall.PULL_TASK_INS.grpc_method == "/flwr.proto.Fleet/PullTaskIns"
    assert [c.rest_path for c in FlowerCall] == [
        f"/api/v0/fleet/{p}"
        for p in (
            "create-node",
            "delete-node",
            "ping",
            "pull-task-ins",
            "push-task-res",
            "get-run",
            "get-fab",
        )
    ]
    assert REST_PREFIX == "/api/v0/stamen/fleet"
    assert not {v.rest_path for v in Verb} & {c.rest_path for c in FlowerCall}
    assert not {v.grpc_method for v in Verb} & {c.grpc_method for c in FlowerCall}
