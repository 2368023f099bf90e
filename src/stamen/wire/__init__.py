"""Wire format: the only package that imports protobuf.

Messages go in as Stamen dataclasses and come out as bytes, and back; decoding anything
but valid bytes raises :class:`~stamen.errors.DecodeError`.
"""

from __future__ import annotations

from . import fleet_codec, flower_codec
from .codec import (
    RefusedResult,
    decode_instruction,
    decode_reply,
    decode_server_message,
    encode_instruction,
    encode_instruction_payload,
    encode_reply,
    encode_reply_payload,
    with_refused_result,
)
from .flower_routes import (
    FLOWER_FLEET_SERVICE_NAME,
    FLOWER_REST_CONTENT_TYPE,
    FLOWER_REST_PREFIX,
    FlowerCall,
)
from .frames import (
    FRAMES_METADATA,
    FRAMING,
    HEARTBEAT_MESSAGE,
    HEARTBEAT_METADATA,
    FrameReader,
    Payload,
    frame_size,
    is_heartbeat,
)
from .routes import (
    BIDI_JOIN_METHOD,
    BIDI_METHOD_NAME,
    BIDI_SERVICE_NAME,
    FLEET_SERVICE_NAME,
    REST_CONTENT_TYPE,
    REST_PREFIX,
    Verb,
)

__all__ = [
    "BIDI_JOIN_METHOD",
    "BIDI_METHOD_NAME",
    "BIDI_SERVICE_NAME",
    "FLEET_SERVICE_NAME",
    "FLOWER_FLEET_SERVICE_NAME",
    "FLOWER_REST_CONTENT_TYPE",
    "FLOWER_REST_PREFIX",
    "FRAMES_METADATA",
    "FRAMING",
    "HEARTBEAT_MESSAGE",
    "HEARTBEAT_METADATA",
    "REST_CONTENT_TYPE",
    "REST_PREFIX",
    "FlowerCall",
    "FrameReader",
    "Payload",
    "RefusedResult",
    "Verb",
    "decode_instruction",
    "decode_reply",
    "decode_server_message",
    "encode_instruction",
    "encode_instruction_payload",
    "encode_reply",
    "encode_reply_payload",
    "fleet_codec",
    "flower_codec",
    "frame_size",
    "is_heartbeat",
    "with_refused_result",
]
