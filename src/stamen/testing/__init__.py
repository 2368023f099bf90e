"""Public test kit: real servers on free ports, a fake clock, in-memory certificates."""

from __future__ import annotations

from . import conformance
from .certs import DevCertificates, generate_certificates, generate_node_keys
from .clock import FakeClock
from .nodes import NodeThread, node_threads
from .server import RunningServer, running_server

__all__ = [
    "DevCertificates",
    "FakeClock",
    "NodeThread",
    "RunningServer",
    "conformance",
    "generate_certificates",
    "generate_node_keys",
    "node_threads",
    "running_server",
]
