"""The fleet: how client nodes reach the server, on every transport."""

from __future__ import annotations

from .handler import Fleet, Node
from .service import FleetService

__all__ = ["Fleet", "FleetService", "Node"]
