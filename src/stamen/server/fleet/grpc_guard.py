"""Room for new nodes on the gRPC listener when slow or idle clients fill it.

gRPC core caps the listener's connections (``grpc.max_allowed_incoming_connections``,
:meth:`FleetTiming.grpc_connection_limit`): over the cap it closes each new connection
as it accepts it, so no flood of connections takes the process's last file descriptors
(REST, checkpoints and spill files need theirs). But gRPC keeps the connections it has,
however little they do: clients that connect and drip bytes without ever making a call
would hold every place, and a node could not connect until gRPC's idle limit closed them.

So the guard looks at the listener's connections every :data:`PERIOD` seconds (the
kernel's table of TCP sockets, ``/proc/self/net/tcp6``) and at the calls the server is
serving (:class:`CallLedger`, fed by :func:`tracked`). When the connections reach
:func:`high_water` of the cap, it closes connections that carry no call, down to
:func:`low_water`: first those that never made a call (longest-known first), then those
idle longest. A connection with a call in flight is never closed. Closing is a
``shutdown`` of the socket through a duplicate of gRPC's descriptor, after checking that
the duplicate is the connection meant: gRPC then sees the peer gone and closes it.

Linux only (``/proc``); elsewhere the guard does nothing and the cap alone holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "PERIOD",
    "CallLedger",
    "ConnectionGuard",
    "Link",
    "high_water",
    "low_water",
    "tracked",
    "victims",
]

logger = logging.getLogger("stamen.server")

PERIOD = 0.25
"""Seconds between two looks at the listener's connections (at least: a look that takes
long, on a server with many connections, waits 20 times as long before the next)."""
_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")
_LISTEN = "0A"
_V4_MAPPED = bytes(10) + b"\xff\xff"


# --- the calls being served -------------------------------------------------------------


class CallLedger:
    """Calls in flight and the time of the last one, by gRPC peer (``ipv4:host:port``)."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.last_call: dict[str, float] = {}

    def begin(self, peer: str) -> None:
        self.in_flight[peer] = self.in_flight.get(peer, 0) + 1

    def end(self, peer: str, now: float) -> None:
        left = self.in_flight.get(peer, 1) - 1
        if left > 0:
            self.in_flight[peer] = left
        else:
            self.in_flight.pop(peer, None)
        self.last_call[peer] = now

    def forget_all_but(self, peers: Iterable[str]) -> None:
        """Drop what is known of connections that are gone."""
        keep = set(peers)
        for peer in [p for p in self.last_call if p not in keep and p not in self.in_flight]:
            del self.last_call[peer]


Behaviour = Callable[[Any, Any], Awaitable[Any]]


def _tracking(behaviour: Behaviour, ledger: CallLedger, clock: Callable[[], float]) -> Behaviour:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = context.peer()
        ledger.begin(peer)
        try:
            return await behaviour(request, context)
        finally:
            ledger.end(peer, clock())

    return call


class _Tracked(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    def __init__(
        self, inner: grpc.GenericRpcHandler, ledger: CallLedger, clock: Callable[[], float]
    ) -> None:
        self._inner = inner
        self._ledger = ledger
        self._clock = clock

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        found = self._inner.service(handler_call_details)
        if found is None:
            return None
        kind = ("unary" if not found.request_streaming else "stream") + (
            "_unary" if not found.response_streaming else "_stream"
        )
        behaviour = _tracking(getattr(found, kind), self._ledger, self._clock)
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(behaviour, found.request_deserializer, found.response_serializer)


def tracked(
    handler: grpc.GenericRpcHandler, ledger: CallLedger, clock: Callable[[], float]
) -> grpc.GenericRpcHandler:
    """``handler`` whose calls (coroutines, as grpc.aio serves them) are entered in
    ``ledger`` while they run."""
    return _Tracked(handler, ledger, clock)


# --- which connections to close (no IO) -------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One connection of the listener: its gRPC peer and its socket's inode."""

    peer: str
    inode: int


def high_water(cap: int) -> int:
    """Connections at which the guard starts closing idle ones: 7/8 of the cap."""
    return max(1, cap - max(1, cap // 8))


def low_water(cap: int) -> int:
    """Connections the guard closes idle ones down to: 3/4 of the cap."""
    return max(0, cap - max(2, cap // 4))


def victims(
    links: Iterable[Link],
    ledger: CallLedger,
    first_seen: Mapping[str, float],
    now: float,
    *,
    keep: int,
    min_age: float,
) -> list[Link]:
    """The connections to close so that at most ``keep`` remain, of those carrying no
    call: first those that never made one and have been known for ``min_age`` seconds
    (a node makes its first call as soon as it is connected), longest-known first; then
    those whose last call ended longest ago."""
    links = list(links)
    excess = len(links) - keep
    if excess <= 0:
        return []

    def rank(link: Link) -> tuple[int, float] | None:
        if link.peer in ledger.in_flight:
            return None
        last = ledger.last_call.get(link.peer)
        if last is not None:
            return (1, last)
        seen = first_seen.get(link.peer, now)
        return (0, seen) if now - seen >= min_age else None

    ranked = sorted(
        ((r, link) for link in links if (r := rank(link)) is not None), key=lambda p: p[0]
    )
    return [link for _, link in ranked[:excess]]


# --- the kernel's view (IO) -------------------------------------------------------------


def _address(field: str) -> tuple[str, int]:
    """``(gRPC peer host, port)`` of a ``/proc/net/tcp[6]`` address field."""
    hex_host, hex_port = field.split(":")
    # Each 32-bit word is printed in the host's byte order.
    raw = b"".join(
        int(hex_host[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_host), 8)
    )
    port = int(hex_port, 16)
    if len(raw) == 16 and raw.startswith(_V4_MAPPED):
        raw = raw[12:]
    if len(raw) == 4:
        return f"ipv4:{socket.inet_ntop(socket.AF_INET, raw)}", port
    return f"ipv6:[{socket.inet_ntop(socket.AF_INET6, raw)}]", port


def links_on(port: int) -> list[Link]:
    """The connections accepted on ``port`` (listening sockets and sockets already
    closed are not counted). Empty where ``/proc`` has no such table."""
    wanted = f":{port:04X} "
    found: list[Link] = []
    for table in _TABLES:
        try:
            with open(table) as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            if wanted not in line:
                continue
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state == _LISTEN or not inode or _address(local)[1] != port:
                continue
            host, remote_port = _address(remote)
            found.append(Link(f"{host}:{remote_port}", inode))
    return found


def _descriptors(inodes: set[int]) -> dict[int, int]:
    """This process's descriptors of the sockets with these inodes: inode -> fd."""
    out: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                target = os.readlink(f"/proc/self/fd/{name}")
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode in inodes:
                        out[inode] = int(name)
    return out


def _peer_of(sock: socket.socket) -> str:
    host, port = sock.getpeername()[:2]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"ipv4:{host}:{port}" if "." in host else f"ipv6:[{host}]:{port}"


def close_links(links: Iterable[Link], port: int) -> int:
    """Shut down these connections of the listener on ``port``; return how many were.
    Each is reached through a duplicate of its descriptor, checked to be that
    connection (the descriptor may have been closed and reused since it was listed)."""
    wanted = {link.inode: link.peer for link in links}
    closed = 0
    for inode, fd in _descriptors(set(wanted)).items():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock, contextlib.suppress(OSError):
            if sock.getsockname()[1] == port and _peer_of(sock) == wanted[inode]:
                sock.shutdown(socket.SHUT_RDWR)
                closed += 1
    return closed


# --- the watch --------------------------------------------------------------------------


class ConnectionGuard:
    """Keeps room on the gRPC listener on ``port`` whose connections gRPC caps at ``cap``
    (see the module's doc). Runs on the fleet's loop (:meth:`watch`); its looks at the
    kernel's tables run on a worker thread."""

    def __init__(self, port: int, cap: int, ledger: CallLedger) -> None:
        self.port = port
        self.cap = cap
        self.ledger = ledger
        self.closed = 0
        self._first_seen: dict[str, float] = {}
        self._warned = -math.inf

    async def watch(self) -> None:
        """Look, close what must be, wait; until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.look(loop)
            spent = loop.time() - started
            await asyncio.sleep(max(PERIOD, 20 * spent))

    async def look(self, loop: asyncio.AbstractEventLoop) -> int:
        """One look: close idle connections if there are too many; return how many."""
        links = await asyncio.to_thread(links_on, self.port)
        now = loop.time()
        seen = self._first_seen
        self._first_seen = {link.peer: seen.get(link.peer, now) for link in links}
        self.ledger.forget_all_but(self._first_seen)
        if len(links) < high_water(self.cap):
            return 0
        chosen = victims(
            links,
            self.ledger,
            self._first_seen,
            now,
            keep=low_water(self.cap),
            min_age=PERIOD,
        )
        closed = await asyncio.to_thread(close_links, chosen, self.port) if chosen else 0
        self.closed += closed
        if now - self._warned >= 10.0:
            self._warned = now
            logger.warning(
                "grpc: %d connections open (gRPC refuses more than %d, "
                "FleetTiming.max_grpc_connections): closed %d that carried no call, to make "
                "room; %d closed so far",
                len(links),
                self.cap,
                closed,
                self.closed,
            )
        return closed
