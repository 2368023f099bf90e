"""Copy-lean encoding and decoding of the messages that carry model tensors.

protobuf copies every tensor into its own buffers on the way in and on the way out (about
0.3-0.6 GB/s for a large model here). The tensors are opaque bytes, so this module writes
and reads their fields directly, byte-compatible with protobuf's encoding: a message with
tensors is ``join(small parts encoded by protobuf, tensor field headers, tensors)`` (one
copy), and decoding takes the tensors as views of the received bytes (no copy), handing
only the small remainder to protobuf. Anything unusual (fields repeated, unexpected wire
types) falls back to the plain protobuf path, so semantics never differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import DecodeError
from ..messages import Parameters
from ..protocol.wire_walk import LEN as _LEN
from ..protocol.wire_walk import read_varint, split_fields

__all__ = [
    "length_delimited",
    "parameters_chunks",
    "read_parameters",
    "read_varint",
    "split_fields",
    "varint",
]


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field whose payload is ``length`` bytes."""
    return varint(field << 3 | _LEN) + varint(length)


def parameters_chunks(
    parameters: Parameters, tensor: Callable[[Parameters, int], Any] | None = None
) -> tuple[list[Any], int]:
    """The encoded ``Parameters`` message as chunks (tensors not copied), and its size.

    ``tensor(parameters, i)``: what stands for tensor ``i`` among the chunks (default: the
    tensor itself), e.g. a reference read when the chunks are.
    """
    chunks: list[Any] = []
    size = 0
    for index, data in enumerate(parameters.tensors):
        nbytes = memoryview(data).nbytes
        head = length_delimited(1, nbytes)
        chunks += (head, data if tensor is None else tensor(parameters, index))
        size += len(head) + nbytes
    if parameters.tensor_type:
        kind = parameters.tensor_type.encode("utf-8")
        head = length_delimited(2, len(kind))
        chunks += (head, kind)
        size += len(head) + len(kind)
    return chunks, size


def read_parameters(data: memoryview, start: int, end: int) -> Parameters | None:
    """Decode a ``Parameters`` message in ``data[start:end]``; None if it needs protobuf."""
    tensors: list[bytes | memoryview] = []
    tensor_type = ""
    for field, wire, _, value_start, value_end in split_fields(data, start, end):
        if field == 1 and wire == _LEN:
            tensors.append(data[value_start:value_end].toreadonly())  # a view, not a copy
        elif field == 2 and wire == _LEN:
            try:
                tensor_type = str(data[value_start:value_end], "utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"Parameters.tensor_type is not UTF-8: {exc}") from exc
        else:
            return None
    return Parameters(tensors=tensors, tensor_type=tensor_type)
