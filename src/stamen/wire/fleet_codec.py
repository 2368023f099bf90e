"""Encode and decode Fleet protocol messages. Decoders raise only DecodeError."""

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


def encode_pull_response(response: PullResponse) -> bytes:
    """Serialize a PullInstructionResponse."""
    msg = pb.PullInstructionResponse(
        task_id=response.task_id, server_message=response.server_message
    )
    return msg.SerializeToString()


def decode_pull_response(data: bytes) -> PullResponse:
    """Parse a PullInstructionResponse."""
    return _parse(
        pb.PullInstructionResponse(),
        data,
        lambda m: PullResponse(m.task_id, m.server_message),
    )


def encode_push_request(request: PushRequest) -> bytes:
    """Serialize a PushReplyRequest."""
    msg = pb.PushReplyRequest(task_id=request.task_id, client_message=request.client_message)
    msg.header.protocol_version = request.protocol_version
    msg.header.node_id = request.node_id
    return msg.SerializeToString()


def decode_push_request(data: bytes) -> PushRequest:
    """Parse a PushReplyRequest."""
    return _parse(
        pb.PushReplyRequest(),
        data,
        lambda m: PushRequest(
            m.header.node_id, m.task_id, m.client_message, m.header.protocol_version
        ),
    )


def encode_empty() -> bytes:
    """The body of an empty response (PushReply, DeleteNode, Heartbeat)."""
    return b""
