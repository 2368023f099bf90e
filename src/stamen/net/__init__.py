"""Networking helpers shared by the client and server sides.

One module per concern, each imported by both sides (never by the sans-IO
:mod:`stamen.protocol`): :mod:`.address` (``host:port`` parsing), :mod:`.limits` (message
size bounds), :mod:`.tls` (PEM loading, credentials, TLS diagnosis) and :mod:`.loop` (an
asyncio event loop in a thread of its own).
"""

from __future__ import annotations

__all__: list[str] = []
