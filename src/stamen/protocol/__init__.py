"""Sans-IO protocol core: state machines and policies, no sockets, threads or clocks.

Nothing here imports grpc, an HTTP library, socket, threading or time (a test checks it).
"""

from __future__ import annotations

from .clock import Clock
from .mailbox import Mailbox, Task
from .retry import Backoff, RetryPolicy
from .session import Event, NodeSession, State

__all__ = [
    "Backoff",
    "Clock",
    "Event",
    "Mailbox",
    "NodeSession",
    "RetryPolicy",
    "State",
    "Task",
]
