"""Walking protobuf wire bytes without building messages (sans-IO).

The codecs (``stamen.wire``) and the counters that bound what a peer may send
(:mod:`.record_limits`) read field headers here: a field's number, wire type and where its
value lies, nothing allocated per field.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import DecodeError

__all__ = ["LEN", "read_varint", "split_fields"]

LEN = 2
"""The wire type of length-delimited fields (bytes, strings, messages, packed lists)."""


def read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``data[pos:end]`` and the position after it."""
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def split_fields(
    data: memoryview, start: int, end: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """Walk a message's fields: ``(field, wire_type, tag_start, value_start, value_end)``.

    Raises:
        DecodeError: truncated data, a group, or an unknown wire type.
    """
    pos = start
    while pos < end:
        tag_start = pos
        tag, pos = read_varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wire == 0:
            _, value_end = read_varint(data, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == LEN:
            length, pos = read_varint(data, pos, end)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        if value_end > end:
            raise DecodeError("truncated field")
        yield field, wire, tag_start, pos, value_end
        pos = value_end
