"""Properties of the Flower Fleet API codec: round trips, CLIENT_ERROR mapping, DecodeError only."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stamen.errors import DecodeError
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
from stamen.protocol import flower_fleet as ff
from stamen.wire import flower_codec as fc

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    floats,
    texts,
    st.binary(max_size=16),
)
configs = st.dictionaries(texts, scalars, max_size=5)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


npy_tensors = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
).map(_npy)
parameters = st.one_of(
    st.builds(
        Parameters, tensors=st.lists(npy_tensors, max_size=3), tensor_type=st.just("numpy.ndarray")
    ),
    # Any other tensor type: opaque bytes, kept as they are.
    st.builds(
        Parameters,
        tensors=st.lists(st.binary(max_size=32), max_size=3),
        tensor_type=texts.filter(lambda t: t != fc.NUMPY_STYPE),
    ),
)
flower_codes = st.sampled_from([c for c in Code if c is not Code.CLIENT_ERROR])
statuses = st.builds(Status, code=flower_codes, message=texts)
instructions = st.one_of(
    st.builds(FitIns, parameters=parameters, config=configs),
    st.builds(EvaluateIns, parameters=parameters, config=configs),
    st.builds(GetParametersIns, config=configs),
    st.builds(GetPropertiesIns, config=configs),
)


def _replies(status: Any) -> Any:
    return st.one_of(
        st.builds(
            FitRes, status=status, parameters=parameters, num_examples=int64, metrics=configs
        ),
        st.builds(EvaluateRes, status=status, loss=floats, num_examples=int64, metrics=configs),
        st.builds(GetParametersRes, status=status, parameters=parameters),
        st.builds(GetPropertiesRes, status=status, properties=configs),
    )


nodes = st.builds(ff.Node, node_id=uint64, anonymous=st.booleans())


def _meta(message_type: str) -> Any:
    return st.builds(
        ff.TaskMeta,
        task_id=texts,
        run_id=uint64,
        message_type=st.just(message_type),
        group_id=texts,
        producer=nodes,
        consumer=nodes,
        created_at=floats,
        delivered_at=texts,
        pushed_at=floats,
        ttl=floats,
        ancestry=st.lists(texts, max_size=2).map(tuple),
    )


task_ins = instructions.flatmap(
    lambda ins: _meta(ff.message_type_of(ins)).map(lambda meta: ff.TaskIns(meta, ins))
)
errors = st.builds(ff.FlowerError, code=int64, reason=texts)
task_res = st.one_of(
    _replies(statuses).flatmap(
        lambda r: _meta(ff.message_type_of(r)).map(lambda meta: ff.TaskRes(meta, reply=r))
    ),
    st.builds(lambda meta, e: ff.TaskRes(meta, error=e), _meta("train"), errors),
)
intervals = st.floats(min_value=0, max_value=1e9)
reconnects = st.none() | st.builds(ff.Reconnect, reconnect=uint64)
runs = st.builds(
    ff.Run,
    run_id=uint64,
    fab_id=texts,
    fab_version=texts,
    override_config=configs,
    fab_hash=texts,
)

CASES: list[tuple[Any, Callable[[Any], bytes], Callable[[bytes], Any]]] = [
    (
        st.builds(ff.CreateNodeRequest, ping_interval=intervals),
        fc.encode_create_node_request,
        fc.decode_create_node_request,
    ),
    (
        st.builds(ff.CreateNodeResponse, node=nodes),
        fc.encode_create_node_response,
        fc.decode_create_node_response,
    ),
    (
        st.builds(ff.DeleteNodeRequest, node=nodes),
        fc.encode_delete_node_request,
        fc.decode_delete_node_request,
    ),
    (
        st.just(ff.DeleteNodeResponse()),
        fc.encode_delete_node_response,
        fc.decode_delete_node_response,
    ),
    (
        st.builds(ff.PingRequest, node=nodes, ping_interval=intervals),
        fc.encode_ping_request,
        fc.decode_ping_request,
    ),
    (
        st.builds(ff.PingResponse, success=st.booleans()),
        fc.encode_ping_response,
        fc.decode_ping_response,
    ),
    (
        st.builds(
            ff.PullTaskInsRequest, node=nodes, task_ids=st.lists(texts, max_size=3).map(tuple)
        ),
        fc.encode_pull_task_ins_request,
        fc.decode_pull_task_ins_request,
    ),
    (
        st.builds(
            ff.PullTaskInsResponse,
            task_ins_list=st.lists(task_ins, max_size=3).map(tuple),
            reconnect=reconnects,
        ),
        fc.encode_pull_task_ins_response,
        fc.decode_pull_task_ins_response,
    ),
    (
        st.builds(
            ff.PushTaskResRequest,
            node=nodes,
            task_res_list=st.lists(task_res, max_size=3).map(tuple),
        ),
        fc.encode_push_task_res_request,
        fc.decode_push_task_res_request,
    ),
    (
        st.builds(
            ff.PushTaskResResponse,
            results=st.dictionaries(texts, st.integers(0, 2**32 - 1), max_size=3),
            reconnect=reconnects,
        ),
        fc.encode_push_task_res_response,
        fc.decode_push_task_res_response,
    ),
    (
        st.builds(ff.GetRunRequest, node=nodes, run_id=uint64),
        fc.encode_get_run_request,
        fc.decode_get_run_request,
    ),
    (
        st.builds(ff.GetRunResponse, run=runs),
        fc.encode_get_run_response,
        fc.decode_get_run_response,
    ),
    (
        st.builds(ff.GetFabRequest, node=nodes, hash_str=texts),
        fc.encode_get_fab_request,
        fc.decode_get_fab_request,
    ),
    (
        st.builds(
            ff.GetFabResponse, fab=st.builds(ff.Fab, hash_str=texts, content=st.binary(max_size=64))
        ),
        fc.encode_get_fab_response,
        fc.decode_get_fab_response,
    ),
]
DECODERS = [decode for _, _, decode in CASES]


@SETTINGS
@given(st.data())
def test_flower_fleet_messages_round_trip(data: st.DataObject) -> None:
    """Every Flower Fleet request and response, tasks of every legacy kind included (every
    Scalar kind, .npy and opaque tensors, every status code Flower knows, errors), decodes
    to an equal one: nothing is lost or re-typed, .npy bytes come back as they were."""
    strategy, encode, decode = data.draw(st.sampled_from(CASES))
    message = data.draw(strategy)
    assert decode(encode(message)) == message


@SETTINGS
@given(reply=_replies(st.builds(Status, code=st.just(Code.CLIENT_ERROR), message=texts)))
def test_client_error_travels_as_the_code_flower_knows(reply: Any) -> None:
    """A CLIENT_ERROR reply is pushed with the NOT_IMPLEMENTED code of its kind (the one
    non-OK code Flower 1.12 knows for it), its message and everything else unchanged."""
    meta = ff.TaskMeta(task_id="t", run_id=1, message_type=ff.message_type_of(reply))
    request = ff.PushTaskResRequest(ff.Node(5), (ff.TaskRes(meta, reply=reply),))
    (decoded,) = fc.decode_push_task_res_request(
        fc.encode_push_task_res_request(request)
    ).task_res_list
    assert isinstance(decoded, ff.TaskRes)
    assert decoded.reply == ff.reply_for_flower_peer(reply)
    assert decoded.reply is not None
    expected = {
        FitRes: Code.FIT_NOT_IMPLEMENTED,
        EvaluateRes: Code.EVALUATE_NOT_IMPLEMENTED,
        GetParametersRes: Code.GET_PARAMETERS_NOT_IMPLEMENTED,
        GetPropertiesRes: Code.GET_PROPERTIES_NOT_IMPLEMENTED,
    }[type(reply)]
    assert decoded.reply.status == Status(expected, reply.status.message)


@SETTINGS
@given(decode=st.sampled_from(DECODERS), data=st.binary(max_size=300))
def test_decoders_raise_only_decode_error_on_any_bytes(decode: Any, data: bytes) -> None:
    """Arbitrary bytes decode to a message or raise DecodeError, nothing else."""
    with contextlib.suppress(DecodeError):
        decode(data)


@SETTINGS
@given(st.data())
def test_damaged_messages_raise_only_decode_error(data: st.DataObject) -> None:
    """A valid encoding with one byte changed or cut short decodes to some message (a task
    possibly unreadable) or raises DecodeError, nothing else."""
    strategy, encode, decode = data.draw(st.sampled_from(CASES))
    encoded = bytearray(encode(data.draw(strategy)))
    if not encoded:
        return
    index = data.draw(st.integers(0, len(encoded) - 1))
    if data.draw(st.booleans()):
        encoded[index] = data.draw(st.integers(0, 255))
    else:
        del encoded[index:]
    with contextlib.suppress(DecodeError):
        decode(bytes(encoded))
