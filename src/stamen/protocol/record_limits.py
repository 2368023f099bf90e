"""Counting what a Flower 1.12 PushTaskResRequest holds, from its wire bytes (sans-IO).

A TaskRes carries a RecordSet: parameters records (many arrays), metrics and configs
records (many entries). Decoding builds an object per array, record and entry, so a peer
that sends millions of tiny ones makes the server spend memory and time out of proportion
to its bytes. :func:`check_push_task_res` counts them first by walking field headers
(:mod:`.wire_walk`): the walk stops at the first limit passed, so what it costs is bounded
by the limits, not by what the bytes claim, and it allocates nothing per field.

Every message on the way (TaskRes, Task, RecordSet, a record, a value) may hold at most
:data:`OTHER_FIELDS` fields besides the ones counted (protobuf merges a repeated singular
field, so repeats are work too). Bytes that are no protobuf are left to the decoder, which
says how they are wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import DecodeError, ErrorKind, FleetError
from .wire_walk import LEN, read_varint, split_fields

__all__ = [
    "OTHER_FIELDS",
    "RecordLimits",
    "check_push_task_res",
    "push_task_res_node_id",
]

OTHER_FIELDS = 32
"""Fields of any one message of a TaskRes besides those counted against a limit."""


@dataclass(frozen=True)
class RecordLimits:
    """What one PushTaskResRequest may hold, in all its TaskRes together.

    Attributes:
        max_arrays: Arrays of its parameters records (and as many array names).
        max_entries: Entries of its metrics and configs records, list elements included.
        max_records: Records of its RecordSets (parameters, metrics and configs).
        max_task_res: TaskRes in the request (a Flower node pushes one).
    """

    max_arrays: int = 100_000
    max_entries: int = 10_000
    max_records: int = 64
    max_task_res: int = 16

    def limit(self, counter: str) -> tuple[int, str]:
        """The limit of ``counter`` and the name of the attribute that sets it."""
        name = _LIMIT_OF[counter]
        return int(getattr(self, name)), name


_LIMIT_OF = {
    "TaskRes": "max_task_res",
    "records": "max_records",
    "arrays": "max_arrays",
    "array names": "max_arrays",
    "metrics and configs entries": "max_entries",
}

_ONE, _FIXED64, _VARINT = "one", "fixed64", "varint"
"""How a counted field counts: once; as a list of 8-byte numbers (packed: length / 8); as
a list of varints (packed: one per final byte)."""

_ENTRIES = "metrics and configs entries"
_Field = tuple[str | None, str | None, str]
"""A field's schema: (message it holds, counter it counts against, how it counts)."""
_Schema = Mapping[int, _Field]

_SCHEMAS: dict[str, _Schema] = {
    "PushTaskResRequest": {2: ("TaskRes", "TaskRes", _ONE)},
    "TaskRes": {4: ("Task", None, _ONE)},
    "Task": {9: ("RecordSet", None, _ONE)},
    "RecordSet": {
        1: ("ParametersRecord entry", "records", _ONE),
        2: ("MetricsRecord entry", "records", _ONE),
        3: ("ConfigsRecord entry", "records", _ONE),
    },
    "ParametersRecord entry": {2: ("ParametersRecord", None, _ONE)},
    "MetricsRecord entry": {2: ("MetricsRecord", None, _ONE)},
    "ConfigsRecord entry": {2: ("ConfigsRecord", None, _ONE)},
    "ParametersRecord": {1: (None, "array names", _ONE), 2: ("Array", "arrays", _ONE)},
    "Array": {},
    "MetricsRecord": {1: ("MetricsRecord value entry", _ENTRIES, _ONE)},
    "ConfigsRecord": {1: ("ConfigsRecord value entry", _ENTRIES, _ONE)},
    "MetricsRecord value entry": {2: ("MetricsRecordValue", None, _ONE)},
    "ConfigsRecord value entry": {2: ("ConfigsRecordValue", None, _ONE)},
    "MetricsRecordValue": {21: ("DoubleList", None, _ONE), 22: ("VarintList", None, _ONE)}
    | {23: ("VarintList", None, _ONE)},
    "ConfigsRecordValue": {21: ("DoubleList", None, _ONE), 22: ("VarintList", None, _ONE)}
    | {23: ("VarintList", None, _ONE), 24: ("VarintList", None, _ONE)}
    | {25: ("BytesList", None, _ONE), 26: ("BytesList", None, _ONE)},
    "DoubleList": {1: (None, _ENTRIES, _FIXED64)},
    "VarintList": {1: (None, _ENTRIES, _VARINT)},
    "BytesList": {1: (None, _ENTRIES, _ONE)},
}
"""The messages of a PushTaskResRequest that are walked, by Flower 1.12's field numbers
(``wire/proto/stamen_flower_fleet.proto``): where each counted field is, and what it holds."""


def _view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _elements(how: str, wire: int, view: memoryview, start: int, end: int) -> int:
    """How many list elements one field holds (a packed list holds many)."""
    if how == _ONE or wire != LEN:
        return 1
    if how == _FIXED64:
        return (end - start) // 8
    final = bytes(view[start:end]).translate(None, bytes(range(0x80, 0x100)))
    return len(final)  # each varint ends with one byte under 0x80


class _Count:
    """The counters of one walk, each checked against its limit as it grows."""

    def __init__(self, limits: RecordLimits) -> None:
        self.limits = limits
        self.counts: dict[str, int] = {}

    def add(self, counter: str, n: int) -> None:
        total = self.counts.get(counter, 0) + n
        self.counts[counter] = total
        limit, name = self.limits.limit(counter)
        if total > limit:
            raise FleetError(
                ErrorKind.INVALID_ARGUMENT,
                f"PushTaskResRequest: more than {limit} {counter} (RecordLimits.{name}: the "
                "most a reply to this task may hold); refused before decoding",
            )


def _walk(view: memoryview, start: int, end: int, message: str, count: _Count) -> None:
    schema = _SCHEMAS[message]
    others = 0
    for field, wire, _, value_start, value_end in split_fields(view, start, end):
        child, counter, how = schema.get(field, (None, None, _ONE))
        if counter is not None:
            count.add(counter, _elements(how, wire, view, value_start, value_end))
        else:
            others += 1
            if others > OTHER_FIELDS:
                raise FleetError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"PushTaskResRequest: a {message} with more than {OTHER_FIELDS} fields "
                    "(besides those counted); refused before decoding",
                )
        if child is not None and wire == LEN:
            _walk(view, value_start, value_end, child, count)


def check_push_task_res(
    data: bytes | bytearray | memoryview, limits: RecordLimits
) -> dict[str, int]:
    """Count the TaskRes, records, arrays and entries of PushTaskResRequest bytes against
    ``limits``; return the counts. Bytes that do not parse are left to the decoder (the
    counts so far are returned).

    Raises:
        FleetError: INVALID_ARGUMENT, naming the limit passed.
    """
    count = _Count(limits)
    view = _view(data)
    with contextlib.suppress(DecodeError):  # the decoder refuses them, saying how
        _walk(view, 0, len(view), "PushTaskResRequest", count)
    return count.counts


def _field(view: memoryview, start: int, end: int, number: int, wire: int) -> tuple[int, int]:
    """Where the last field ``number`` of wire type ``wire`` lies among the first
    :data:`OTHER_FIELDS` fields of ``view[start:end]``; ``(-1, -1)`` if it is not there."""
    found = (-1, -1)
    for seen, (field, field_wire, _, value_start, value_end) in enumerate(
        split_fields(view, start, end)
    ):
        if seen >= OTHER_FIELDS:
            break
        if field == number and field_wire == wire:
            found = (value_start, value_end)
    return found


def push_task_res_node_id(data: bytes | bytearray | memoryview) -> int | None:
    """The node id of PushTaskResRequest bytes (``node.node_id``, among the first
    :data:`OTHER_FIELDS` fields of each); None if absent or unreadable."""
    view = _view(data)
    try:
        start, end = _field(view, 0, len(view), 1, LEN)
        if start < 0:
            return None
        start, end = _field(view, start, end, 1, 0)
        return None if start < 0 else read_varint(view, start, end)[0]
    except DecodeError:
        return None
