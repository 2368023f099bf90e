"""RPC method names and REST paths, defined once for client and server."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "BIDI_JOIN_METHOD",
    "BIDI_METHOD_NAME",
    "BIDI_SERVICE_NAME",
    "FLEET_SERVICE_NAME",
    "REST_CONTENT_TYPE",
    "REST_PREFIX",
    "Verb",
]

BIDI_SERVICE_NAME = "flwr.proto.FlowerService"
"""Flower's service name: what a Flower peer dials, so Stamen registers under it."""

BIDI_METHOD_NAME = "Join"

BIDI_JOIN_METHOD = f"/{BIDI_SERVICE_NAME}/{BIDI_METHOD_NAME}"
"""Full method path of the grpc-bidi stream (``stream ClientMessage -> stream ServerMessage``)."""

FLEET_SERVICE_NAME = "stamen.v1.Fleet"
"""gRPC service of the Fleet protocol (grpc-rere)."""

REST_PREFIX = "/api/v0/stamen/fleet"
"""REST paths are ``POST {REST_PREFIX}/{verb}``. Flower's Fleet API owns ``/api/v0/fleet``
(see :mod:`.flower_routes`), so Stamen's own calls live under a prefix of their own."""

REST_CONTENT_TYPE = "application/protobuf"


@dataclass(frozen=True)
class _Route:
    method_name: str
    rest_verb: str


class Verb(Enum):
    """The Fleet protocol's calls, each with its gRPC method and REST path."""

    CREATE_NODE = _Route("CreateNode", "create-node")
    DELETE_NODE = _Route("DeleteNode", "delete-node")
    PULL = _Route("PullInstruction", "pull-instruction")
    PUSH = _Route("PushReply", "push-reply")
    HEARTBEAT = _Route("Heartbeat", "heartbeat")

    @property
    def method_name(self) -> str:
        """gRPC method name within :data:`FLEET_SERVICE_NAME`."""
        return self.value.method_name

    @property
    def grpc_method(self) -> str:
        """Full gRPC method path."""
        return f"/{FLEET_SERVICE_NAME}/{self.value.method_name}"

    @property
    def rest_path(self) -> str:
        """REST path (``POST``)."""
        return f"{REST_PREFIX}/{self.value.rest_verb}"
