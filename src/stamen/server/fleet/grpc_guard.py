"""Room for new nodes on the gRPC listener when slow or idle clients fill it.

gRPC core caps the listener's connections (``grpc.max_allowed_incoming_connections``,
:meth:`FleetTiming.grpc_connection_limits`): over the cap it closes each new connection
as it accepts it, so no flood of connections takes the process's last file descriptors
(REST, checkpoints and spill files need theirs). But gRPC keeps the connections it has,
however little they do: clients that connect and drip bytes without ever making a call
would hold every place, and a node could not connect until gRPC's idle limit closed them.

So the guard looks at the listener's connections every :data:`PERIOD` seconds (the
kernel's table of TCP sockets, ``/proc/self/net/tcp6``) and at the calls the server is
serving (:class:`CallLedger`, fed by :func:`tracked`). Two rules, both pure functions:

* per address (:func:`unused_over_limit`): one IP address may hold at most
  ``FleetTiming.max_grpc_unused_per_peer`` connections that have not made a call; of
  more, those connected for :data:`FIRST_CALL_WITHIN` seconds without a call are closed,
  longest-known first. Connections that made a call do not count, so any number of nodes
  may share an address.
* under pressure (:func:`victims`): when the connections reach :func:`high_water` of the
  cap, connections that carry no call are closed down to :func:`low_water`, one at a
  time from the address holding the most connections (so a flooding address gives way
  before a node from another one loses its connection); within an address, first those
  that never made a call (longest-known first), then those idle longest.

A connection with a call in flight is never closed. Closing is a ``shutdown`` of the
socket through a duplicate of gRPC's descriptor, after checking that the duplicate is
the connection meant: gRPC then sees the peer gone and closes it.

Linux only (``/proc``); elsewhere the guard does nothing and the cap alone holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import os
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "FIRST_CALL_WITHIN",
    "PERIOD",
    "CallLedger",
    "ConnectionGuard",
    "Link",
    "high_water",
    "low_water",
    "tracked",
    "unused_over_limit",
    "victims",
]

logger = logging.getLogger("stamen.server")

PERIOD = 0.25
"""Seconds between two looks at the listener's connections (at least: a look that takes
long, on a server with many connections, waits 20 times as long before the next)."""
FIRST_CALL_WITHIN = 2.0
"""Seconds a connection may stay without a call before the per-address limit may close
it (a node makes its first call at once; gRPC may take a moment to hand it over when
thousands of calls wait)."""
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


def address_of(peer: str) -> str:
    """The IP address of a gRPC peer: ``ipv4:10.0.0.1:5000`` -> ``ipv4:10.0.0.1``."""
    return peer.rpartition(":")[0]


def _never_called(link: Link, ledger: CallLedger) -> bool:
    return link.peer not in ledger.in_flight and link.peer not in ledger.last_call


def unused_over_limit(
    links: Iterable[Link],
    ledger: CallLedger,
    first_seen: Mapping[str, float],
    now: float,
    *,
    limit: int,
    min_age: float,
) -> list[Link]:
    """The connections to close because their address holds more than ``limit`` that
    have not made a call: of each such address's, the longest-known ones over the limit,
    of those known for ``min_age`` seconds. Connections that made a call do not count."""
    unused: dict[str, list[Link]] = {}
    for link in links:
        if _never_called(link, ledger):
            unused.setdefault(address_of(link.peer), []).append(link)
    chosen: list[Link] = []
    for group in unused.values():
        if len(group) <= limit:
            continue
        group.sort(key=lambda link: (first_seen.get(link.peer, now), link.inode))
        old = [link for link in group if now - first_seen.get(link.peer, now) >= min_age]
        chosen += old[: len(group) - limit]
    return chosen


_Rank = tuple[int, float, int]
"""Which of an address's connections goes first: (0 never called / 1 called, since, inode)."""


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
    call, one at a time from the address holding the most connections (all of its
    connections counted, those closed already not). Within an address, and between
    addresses holding as many: first those that never made a call and have been known
    for ``min_age`` seconds (a node makes its first call as soon as it is connected),
    longest-known first; then those whose last call ended longest ago."""
    links = list(links)
    excess = len(links) - keep
    if excess <= 0:
        return []

    def rank(link: Link) -> _Rank | None:
        if link.peer in ledger.in_flight:
            return None
        last = ledger.last_call.get(link.peer)
        if last is not None:
            return (1, last, link.inode)
        seen = first_seen.get(link.peer, now)
        return (0, seen, link.inode) if now - seen >= min_age else None

    closable: dict[str, list[tuple[_Rank, Link]]] = {}
    for link in links:
        if (r := rank(link)) is not None:
            closable.setdefault(address_of(link.peer), []).append((r, link))
    held = Counter(address_of(link.peer) for link in links)
    return _fairly(closable, held, excess)


def _fairly(
    closable: dict[str, list[tuple[_Rank, Link]]], held: Counter[str], count: int
) -> list[Link]:
    """``count`` of the ``closable`` connections (by address, ranked), one at a time from
    the address that ``held`` the most connections, the best-ranked first between
    addresses holding as many."""
    for group in closable.values():
        group.sort(key=lambda pair: pair[0], reverse=True)  # the next victim last
    queue = [(-held[address], group[-1][0], address) for address, group in closable.items()]
    heapq.heapify(queue)
    chosen: list[Link] = []
    while queue and len(chosen) < count:
        _, _, address = heapq.heappop(queue)
        group = closable[address]
        chosen.append(group.pop()[1])
        held[address] -= 1
        if group:
            heapq.heappush(queue, (-held[address], group[-1][0], address))
    return chosen


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
    """Keeps room on the gRPC listener on ``port`` whose connections gRPC caps at ``cap``,
    with at most ``unused_per_peer`` connections that have not made a call per address
    (see the module's doc). Runs on the fleet's loop (:meth:`watch`); its looks at the
    kernel's tables run on a worker thread."""

    def __init__(self, port: int, cap: int, ledger: CallLedger, unused_per_peer: int) -> None:
        self.port = port
        self.cap = cap
        self.unused_per_peer = unused_per_peer
        self.ledger = ledger
        self.closed = 0
        """Connections closed to make room (at high water)."""
        self.closed_unused = 0
        """Connections closed for the per-address limit."""
        self._first_seen: dict[str, float] = {}
        self._warned = {"room": -math.inf, "unused": -math.inf}

    async def watch(self) -> None:
        """Look, close what must be, wait; until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.look(loop)
            spent = loop.time() - started
            await asyncio.sleep(max(PERIOD, 20 * spent))

    async def look(self, loop: asyncio.AbstractEventLoop) -> int:
        """One look: close connections over the per-address limit, then idle ones if
        there are too many; return how many were closed."""
        links = await asyncio.to_thread(links_on, self.port)
        now = loop.time()
        seen = self._first_seen
        self._first_seen = {link.peer: seen.get(link.peer, now) for link in links}
        self.ledger.forget_all_but(self._first_seen)
        crowding = unused_over_limit(
            links,
            self.ledger,
            self._first_seen,
            now,
            limit=self.unused_per_peer,
            min_age=FIRST_CALL_WITHIN,
        )
        closed = await self._close_unused(crowding, now) if crowding else 0
        gone = set(crowding)
        left = [link for link in links if link not in gone]
        if len(left) < high_water(self.cap):
            return closed
        chosen = victims(
            left,
            self.ledger,
            self._first_seen,
            now,
            keep=low_water(self.cap),
            min_age=PERIOD,
        )
        made_room = await asyncio.to_thread(close_links, chosen, self.port) if chosen else 0
        self.closed += made_room
        if self._should_warn("room", now):
            logger.warning(
                "grpc: %d connections open (gRPC refuses more than %d, "
                "FleetTiming.max_grpc_connections): closed %d that carried no call, to make "
                "room (from the addresses holding the most connections first); %d closed "
                "so far",
                len(left),
                self.cap,
                made_room,
                self.closed,
            )
        return closed + made_room

    async def _close_unused(self, chosen: list[Link], now: float) -> int:
        closed = await asyncio.to_thread(close_links, chosen, self.port)
        self.closed_unused += closed
        if self._should_warn("unused", now):
            worst, count = Counter(address_of(link.peer) for link in chosen).most_common(1)[0]
            logger.warning(
                "grpc: closing %d connections that made no call within %.0f s, %d of them "
                "from %s: one address may hold at most %d connections without a call "
                "(FleetTiming.max_grpc_unused_per_peer); %d closed so far",
                closed,
                FIRST_CALL_WITHIN,
                count,
                worst.partition(":")[2],
                self.unused_per_peer,
                self.closed_unused,
            )
        return closed

    def _should_warn(self, reason: str, now: float) -> bool:
        if now - self._warned[reason] < 10.0:
            return False
        self._warned[reason] = now
        return True
