"""Properties of the PushTaskResRequest counter: it counts what the decoder would build,
refuses one past each limit (naming it) before decoding, and costs what its limits allow,
not what the bytes claim."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamen.common import ndarrays_to_parameters
from stamen.errors import ErrorKind, FleetError
from stamen.messages import Code, FitRes, Status
from stamen.protocol import flower_fleet as ff
from stamen.protocol.record_limits import (
    RecordLimits,
    check_push_task_res,
    push_task_res_node_id,
)
from stamen.wire import flower_codec as fc

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENTRIES = "metrics and configs entries"


def _push(node_id: int, tensors: int, metrics: int) -> bytes:
    """A Flower PushTaskResRequest carrying a FitRes of ``tensors`` arrays and ``metrics``
    metrics, as Stamen's Flower codec writes it (Flower's layout)."""
    arrays = [np.full((2,), i, dtype=np.float32) for i in range(tensors)]
    reply = FitRes(
        Status(Code.OK, "ok"),
        ndarrays_to_parameters(arrays),
        7,
        {f"m{i}": float(i) for i in range(metrics)},
    )
    meta = ff.TaskMeta(
        task_id="",
        run_id=1,
        message_type=ff.message_type_of(reply),
        producer=ff.Node(node_id),
        ancestry=("t",),
    )
    return fc.encode_push_task_res_request(
        ff.PushTaskResRequest(ff.Node(node_id), (ff.TaskRes(meta, reply=reply),))
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _hostile_metrics(entries: int, tail: bytes = b"") -> bytes:
    """A PushTaskResRequest whose one metrics record has ``entries`` empty entries (two
    bytes each on the wire, an object each when decoded), then ``tail``."""
    record = _field(1, b"") * entries + tail  # MetricsRecord.data map entries
    recordset = _field(2, _field(1, b"m") + _field(2, record))
    task_res = _field(4, _field(9, recordset))
    return _field(1, b"\x08\x05") + _field(2, task_res)


@SETTINGS
@given(
    node_id=st.integers(min_value=1, max_value=2**64 - 1),
    tensors=st.integers(min_value=0, max_value=40),
    metrics=st.integers(min_value=0, max_value=40),
)
def test_counts_what_the_message_holds_and_refuses_one_past_each_limit(
    node_id: int, tensors: int, metrics: int
) -> None:
    """The arrays counted are the reply's tensors (or its placeholder), the metrics
    entries at least its metrics; limits equal to the counts pass, one under any of them
    is refused, naming it."""
    data = _push(node_id, tensors, metrics)
    assert push_task_res_node_id(data) == node_id
    counts = check_push_task_res(data, RecordLimits())
    arrays = max(tensors, 1)  # no tensors travel as one empty placeholder array
    assert counts["arrays"] == arrays
    assert counts["array names"] == arrays
    assert counts.get(ENTRIES, 0) >= metrics
    assert counts["TaskRes"] == 1
    exact = RecordLimits(
        max_arrays=arrays,
        max_entries=counts.get(ENTRIES, 0),
        max_records=counts.get("records", 0),
        max_task_res=1,
    )
    assert check_push_task_res(data, exact) == counts
    for name, value in (
        ("max_arrays", exact.max_arrays),
        ("max_entries", exact.max_entries),
        ("max_records", exact.max_records),
    ):
        if value == 0:
            continue
        tighter = RecordLimits(**{**exact.__dict__, name: value - 1})
        with pytest.raises(FleetError) as refused:
            check_push_task_res(data, tighter)
        assert refused.value.kind is ErrorKind.INVALID_ARGUMENT
        assert f"RecordLimits.{name}" in refused.value.message


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_counted_or_refused_never_crash(data: bytes) -> None:
    """Any bytes: counts, or a FleetError; never another exception (the decoder judges
    bytes that do not parse)."""
    refusals: list[FleetError] = []
    try:
        check_push_task_res(data, RecordLimits(max_arrays=3, max_entries=3, max_records=2))
    except FleetError as exc:
        refusals.append(exc)
    assert all(r.kind is ErrorKind.INVALID_ARGUMENT for r in refusals)
    push_task_res_node_id(data)


@SETTINGS
@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=50))
def test_packed_lists_count_each_element(values: list[int]) -> None:
    """A packed list of varints in a configs value counts one entry per element."""
    packed = b"".join(_varint(v) for v in values)
    value = _field(22, _field(1, packed))  # ConfigsRecordValue.sint_list
    record = _field(1, _field(1, b"k") + _field(2, value))
    recordset = _field(3, _field(1, b"c") + _field(2, record))
    data = _field(2, _field(4, _field(9, recordset)))
    counts = check_push_task_res(data, RecordLimits())
    assert counts[ENTRIES] == 1 + len(values)


def test_a_million_tiny_entries_are_refused_at_the_limit_not_walked_to_the_end() -> None:
    """Two million empty metrics entries (4 MB) are refused at the 10,001st: the walk
    stops there. The record ends in a truncated field, which a walk to the end would
    reach first (and leave to the decoder, refusing nothing)."""
    hostile = _hostile_metrics(2_000_000, tail=b"\x0a\x7f")
    with pytest.raises(FleetError, match=r"more than 10000 metrics and configs entries"):
        check_push_task_res(hostile, RecordLimits())
    assert check_push_task_res(_hostile_metrics(10, tail=b"\x0a\x7f"), RecordLimits())
