"""Names of the RPC methods, defined once for client and server."""

from __future__ import annotations

__all__ = ["BIDI_JOIN_METHOD", "BIDI_METHOD_NAME", "BIDI_SERVICE_NAME"]

BIDI_SERVICE_NAME = "flwr.proto.FlowerService"
"""Flower's service name: what a Flower peer dials, so Stamen registers under it."""

BIDI_METHOD_NAME = "Join"

BIDI_JOIN_METHOD = f"/{BIDI_SERVICE_NAME}/{BIDI_METHOD_NAME}"
"""Full method path of the grpc-bidi stream (``stream ClientMessage -> stream ServerMessage``)."""
