"""Encode and decode Fleet protocol messages. Decoders raise only DecodeError.

The two messages that carry a model (a PullInstructionResponse's ``server_message``, a
PushReplyRequest's ``client_message``) are written and read by hand, byte-compatible with
protobuf's encoding (``_fast``'s way): encoding is one join of a few header bytes and the
message, decoding takes the message as a view of the received bytes (no copy) and walks
the few other fields, so decoding costs the same whatever the model's size. A layout
protobuf allows but a Stamen peer does not write (a field repeated, an unknown field) goes
through protobuf instead, so the meaning never differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import DecodeError
from ..protocol.fleet import (
    CreateNodeRequest,
    CreateNodeResponse,
    PullRequest,
    PullResponse,
    PushRequest,
    SimpleRequest,
)
from ..protocol.wire_walk import LEN, read_varint, split_fields
from . import _fast
from ._pb import stamen_fleet_pb2 as pb

__all__ = [
    "decode_create_node_request",
    "decode_create_node_response",
    "decode_pull_request",
    "decode_pull_response",
    "decode_push_request",
    "decode_simple_request",
    "encode_create_node_request",
    "encode_create_node_response",
    "encode_empty",
    "encode_pull_request",
    "encode_pull_response",
    "encode_push_request",
    "encode_simple_request",
    "scan_push_request",
]

_T = TypeVar("_T")


def _parse(message: Any, data: bytes, build: Callable[[Any], _T]) -> _T:
    try:
        message.ParseFromString(data)
        return build(message)
    except DecodeError:
        raise
    except Exception as exc:  # protobuf and validators: bad bytes either way
        name = message.DESCRIPTOR.name
        raise DecodeError(f"invalid {name} ({len(data)} bytes): {exc}") from exc


def encode_create_node_request(request: CreateNodeRequest) -> bytes:
    """Serialize a CreateNodeRequest."""
    msg = pb.CreateNodeRequest(max_message_length=request.max_message_length)
    msg.header.protocol_version = request.protocol_version
    return msg.SerializeToString()


def decode_create_node_request(data: bytes) -> CreateNodeRequest:
    """Parse a CreateNodeRequest."""
    return _parse(
        pb.CreateNodeRequest(),
        data,
        lambda m: CreateNodeRequest(m.header.protocol_version, m.max_message_length),
    )


def encode_create_node_response(response: CreateNodeResponse) -> bytes:
    """Serialize a CreateNodeResponse."""
    msg = pb.CreateNodeResponse(
        node_id=response.node_id,
        heartbeat_interval=response.heartbeat_interval,
        poll_timeout=response.poll_timeout,
        max_message_length=response.max_message_length,
    )
    return msg.SerializeToString()


def decode_create_node_response(data: bytes) -> CreateNodeResponse:
    """Parse a CreateNodeResponse."""
    return _parse(
        pb.CreateNodeResponse(),
        data,
        lambda m: CreateNodeResponse(
            m.node_id, m.heartbeat_interval, m.poll_timeout, m.max_message_length
        ),
    )


def encode_simple_request(request: SimpleRequest) -> bytes:
    """Serialize a DeleteNode or Heartbeat request (identical layouts)."""
    msg = pb.HeartbeatRequest()
    msg.header.protocol_version = request.protocol_version
    msg.header.node_id = request.node_id
    return msg.SerializeToString()


def decode_simple_request(data: bytes) -> SimpleRequest:
    """Parse a DeleteNode or Heartbeat request."""
    return _parse(
        pb.HeartbeatRequest(),
        data,
        lambda m: SimpleRequest(m.header.node_id, m.header.protocol_version),
    )


def encode_pull_request(request: PullRequest) -> bytes:
    """Serialize a PullInstructionRequest."""
    msg = pb.PullInstructionRequest(task_id=request.task_id, offset=request.offset)
    msg.header.protocol_version = request.protocol_version
    msg.header.node_id = request.node_id
    return msg.SerializeToString()


def decode_pull_request(data: bytes) -> PullRequest:
    """Parse a PullInstructionRequest."""
    return _parse(
        pb.PullInstructionRequest(),
        data,
        lambda m: PullRequest(
            m.header.node_id, m.task_id, m.offset, protocol_version=m.header.protocol_version
        ),
    )


def _bytes_field(field: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    """A bytes field's encoding as parts (none for empty bytes: proto3 omits them)."""
    return [_fast.length_delimited(field, len(data)), data] if len(data) else []


def _varint_field(field: int, value: int) -> bytes:
    """A varint field's encoding (empty for 0: proto3 omits it)."""
    return _fast.varint(field << 3) + _fast.varint(value) if value else b""


def encode_pull_response(response: PullResponse) -> bytes:
    """Serialize a PullInstructionResponse (by hand: one copy of the message, also when
    it is a frame given as views of the model)."""
    head = _varint_field(1, response.task_id)
    message = response.server_message
    if isinstance(message, bytes | memoryview):
        return b"".join([head, *_bytes_field(2, message)])
    if not len(message):
        return head
    return message.preceded_by(head + _fast.length_delimited(2, len(message))).tobytes()


def _scan(
    data: bytes | memoryview, varints: tuple[int, ...], payload: int, header: bool
) -> tuple[dict[int, int], memoryview, memoryview | None] | None:
    """The fields of a model-carrying Fleet message: each varint field's value, the bytes
    field ``payload`` as a view, the header's bytes (when ``header``) as a view; None
    when a field is repeated or unknown (protobuf decodes it then).

    Raises:
        DecodeError: truncated or malformed fields.
    """
    view = memoryview(data).cast("B")
    values: dict[int, int] = {}
    found: memoryview | None = None
    head: memoryview | None = None
    for field, wire, _, start, end in split_fields(view, 0, len(view)):
        if field in varints and wire == 0 and field not in values:
            values[field] = read_varint(view, start, end)[0]
            if values[field] >= 1 << 64:  # protobuf's business: it keeps the low 64 bits
                return None
        elif field == payload and wire == LEN and found is None:
            found = view[start:end]
        elif header and field == 1 and wire == LEN and head is None:
            head = view[start:end]
        else:
            return None
    return values, (found if found is not None else view[0:0]), head


def decode_pull_response(data: bytes | memoryview) -> PullResponse:
    """Parse a PullInstructionResponse; its message is a view of ``data``."""
    try:
        scanned = _scan(data, (1,), 2, header=False)
    except DecodeError as exc:
        raise DecodeError(f"invalid PullInstructionResponse ({len(data)} bytes): {exc}") from exc
    if scanned is None:
        return _parse(
            pb.PullInstructionResponse(),
            bytes(data),
            lambda m: PullResponse(m.task_id, m.server_message),
        )
    values, message, _ = scanned
    return PullResponse(values.get(1, 0), message.toreadonly())


def _header(request: PushRequest) -> bytes:
    msg = pb.RequestHeader(protocol_version=request.protocol_version, node_id=request.node_id)
    return msg.SerializeToString()


def encode_push_request(request: PushRequest) -> bytes:
    """Serialize a PushReplyRequest (by hand: one copy of the message)."""
    header = _header(request)
    return b"".join(
        [
            _fast.length_delimited(1, len(header)),  # present even when empty, as protobuf's
            header,
            _varint_field(2, request.task_id),
            *_bytes_field(3, request.client_message),
        ]
    )


def scan_push_request(data: bytes | memoryview) -> PushRequest | None:
    """Parse a PushReplyRequest laid out as Stamen peers write it, in time independent of
    its size (its message is a view of ``data``); None for any other layout, which
    :func:`decode_push_request` hands to protobuf.

    Raises:
        DecodeError: truncated or malformed fields.
    """
    try:
        scanned = _scan(data, (2,), 3, header=True)
        if scanned is None:
            return None
        values, message, head = scanned
        header = pb.RequestHeader()
        if head is not None:
            header.ParseFromString(head.tobytes())
    except Exception as exc:  # malformed fields, or a header protobuf refuses
        raise DecodeError(f"invalid PushReplyRequest ({len(data)} bytes): {exc}") from exc
    task_id = values.get(2, 0)
    return PushRequest(header.node_id, task_id, message.toreadonly(), header.protocol_version)


def decode_push_request(data: bytes | memoryview) -> PushRequest:
    """Parse a PushReplyRequest (see :func:`scan_push_request`)."""
    scanned = scan_push_request(data)
    if scanned is not None:
        return scanned
    return _parse(
        pb.PushReplyRequest(),
        bytes(data),
        lambda m: PushRequest(
            m.header.node_id, m.task_id, m.client_message, m.header.protocol_version
        ),
    )


def encode_empty() -> bytes:
    """The body of an empty response (PushReply, DeleteNode, Heartbeat)."""
    return b""
