"""Public test kit: real servers on free ports, a fake clock, in-memory certificates."""

from __future__ import annotations

from .certs import TestCertificates, generate_certificates, generate_node_keys
from .clock import FakeClock
from .server import RunningServer, running_server

__all__ = [
    "FakeClock",
    "RunningServer",
    "TestCertificates",
    "generate_certificates",
    "generate_node_keys",
    "running_server",
]
