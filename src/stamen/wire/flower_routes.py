"""Flower 1.12's Fleet API: gRPC method paths and REST paths, defined once.

Flower's SuperNodes and SuperLinks call ``/flwr.proto.Fleet/<Method>`` (grpc-rere) or
``POST /api/v0/fleet/<path>`` (rest) with protobuf bodies; Stamen serves and calls them
under exactly these names (its own Fleet protocol lives elsewhere: :mod:`.routes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "FLOWER_FLEET_SERVICE_NAME",
    "FLOWER_REST_CONTENT_TYPE",
    "FLOWER_REST_PREFIX",
    "FlowerCall",
]

FLOWER_FLEET_SERVICE_NAME = "flwr.proto.Fleet"
"""Flower's gRPC service name: what a Flower SuperNode dials."""

FLOWER_REST_PREFIX = "/api/v0/fleet"
"""Flower's REST paths are ``POST {FLOWER_REST_PREFIX}/{path}``."""

FLOWER_REST_CONTENT_TYPE = "application/protobuf"


@dataclass(frozen=True)
class _FlowerRoute:
    method_name: str
    rest_verb: str


class FlowerCall(Enum):
    """The calls of Flower 1.12's Fleet API, each with its gRPC method and REST path.

    The request and response messages of a call are its method name + ``Request`` /
    ``Response`` (see :mod:`stamen.wire.flower_codec`).
    """

    CREATE_NODE = _FlowerRoute("CreateNode", "create-node")
    DELETE_NODE = _FlowerRoute("DeleteNode", "delete-node")
    PING = _FlowerRoute("Ping", "ping")
    PULL_TASK_INS = _FlowerRoute("PullTaskIns", "pull-task-ins")
    PUSH_TASK_RES = _FlowerRoute("PushTaskRes", "push-task-res")
    GET_RUN = _FlowerRoute("GetRun", "get-run")
    GET_FAB = _FlowerRoute("GetFab", "get-fab")

    @property
    def method_name(self) -> str:
        """gRPC method name within :data:`FLOWER_FLEET_SERVICE_NAME`."""
        return self.value.method_name

    @property
    def grpc_method(self) -> str:
        """Full gRPC method path, e.g. ``/flwr.proto.Fleet/PullTaskIns``."""
        return f"/{FLOWER_FLEET_SERVICE_NAME}/{self.value.method_name}"

    @property
    def rest_path(self) -> str:
        """REST path (``POST``), e.g. ``/api/v0/fleet/pull-task-ins``."""
        return f"{FLOWER_REST_PREFIX}/{self.value.rest_verb}"
