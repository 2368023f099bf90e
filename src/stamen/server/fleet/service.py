"""The server's listeners: one event loop thread, one gRPC server, an optional REST server."""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import grpc

from ...errors import ConfigError
from ...memory import tune_allocator, tune_collector
from ...net.address import parse_address
from ...net.limits import grpc_message_options
from ...net.loop import LoopThread
from ...net.tls import load_pem, pem_files, server_credentials
from ..client_manager import ClientManager
from ..events import RunEvents
from .auth import FlowerAuthenticator, NodeAuthenticator, ServerKeys
from .flower import FlowerFleet
from .flower_grpc import flower_handler
from .grpc_bidi import bidi_handler
from .grpc_guard import CallLedger, ConnectionGuard, tracked
from .grpc_rere import rere_handler
from .handler import Fleet, FleetTiming
from .rest import RestListener, descriptor_limit

__all__ = ["FleetService", "raise_descriptor_limit", "server_options"]

logger = logging.getLogger("stamen.server")

_MAX_CONNECTIONS = "grpc.max_allowed_incoming_connections"

PENDING_CALLS = 1 << 16
"""Calls gRPC holds that the server has not taken yet (``grpc.server.max_pending_requests``
and its hard limit). gRPC's defaults cancel calls at random once 1,000 wait and all of them
past 3,000, which thousands of nodes calling at once (a round's start on grpc-rere, a
fleet connecting on grpc-bidi) reach in a moment: the server's event loop takes calls one
at a time. A waiting call still gives up after gRPC's 30 s in that queue."""


def server_options(
    max_message_length: int, idle_limit: float = 60.0, max_connections: int | None = None
) -> list[tuple[str, Any]]:
    """gRPC server options.

    gRPC accepts at most ``max_connections`` connections at once (None: no limit) and
    closes more as they arrive (see :mod:`.grpc_guard`).

    A connection with no call for ``idle_limit`` seconds is closed (see
    :attr:`FleetTiming.connection_idle_limit`). One that does not complete its handshake
    is closed by gRPC after its own limit (120 s): a limit tied to the heartbeat timeout
    can be as short as 5 s, too close to what a TLS handshake may take when thousands of
    nodes connect at once to a busy server.

    The server pings idle streams every 60 s and drops a node that does not answer within
    20 s, so a vanished grpc-bidi node fails its instruction without waiting for
    ``round_timeout``. ``so_reuseport`` is off, so a port already in use is an error, not
    a second server silently sharing it. Flow-control windows stay at gRPC's default
    instead of growing with bandwidth probes: a node whose large reply waits for its turn
    (``ReceiveSlots``) then has a few KiB buffered on the server, not tens of MB.
    """
    return [
        *grpc_message_options(max_message_length),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_connection_idle_ms", max(1, round(idle_limit * 1000))),
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
        *([] if max_connections is None else [(_MAX_CONNECTIONS, max_connections)]),
    ]


def raise_descriptor_limit() -> int:
    """Raise the process's soft limit of open files to its hard limit (each connected node
    holds a descriptor); return the soft limit now in force. Logged when raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.info("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            return soft
        logger.info("raised the open-files limit from %d to %d (each node holds one)", soft, target)
        return target
    return soft


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of the REST listener -> (host, port).

    Raises:
        ConfigError: not such an address (:func:`stamen.net.address.parse_address`).
    """
    return parse_address(address, field="rest_address")


class FleetService:
    """Starts and stops everything that serves client nodes.

    Args:
        client_manager: Where connecting nodes are registered.
        address: ``host:port`` of the gRPC listener (grpc-bidi and grpc-rere; port 0 picks
            a free one).
        max_message_length: Bound of one message, both ways, on every transport.
        certificates: ``(ca_cert, server_cert, server_key)`` PEM bytes for TLS, or None.
        rest_address: ``host:port`` of the REST listener, or None for no REST.
        timing: Heartbeat and long-poll timing of pull-based nodes.
        require_client_certificate: Mutual TLS: refuse nodes without a certificate signed
            by ``certificates[0]`` (the CA), on every port.
        authenticator: Checks node signatures on every request of every transport (None:
            nodes are not authenticated). Flower 1.12 nodes authenticate against the same
            keys with Flower's scheme, on grpc-rere only.
        server_keys: The EC key pair Flower nodes derive their HMAC key with (None: one
            is generated per curve when ``authenticator`` is given).
        events: Where nodes coming and going are published (the server's run events).

    Flower 1.12's Fleet API (``flwr.proto.Fleet`` on the gRPC port, ``/api/v0/fleet/*``
    on the REST port) is served beside Stamen's own protocols, into the same fleet.
    """

    def __init__(
        self,
        client_manager: ClientManager,
        *,
        address: str,
        max_message_length: int,
        certificates: tuple[bytes, bytes, bytes] | None = None,
        rest_address: str | None = None,
        timing: FleetTiming | None = None,
        require_client_certificate: bool = False,
        authenticator: NodeAuthenticator | None = None,
        events: RunEvents | None = None,
        server_keys: ServerKeys | None = None,
    ) -> None:
        if require_client_certificate and certificates is None:
            raise ConfigError("require_client_certificate: mutual TLS needs certificates")
        if server_keys is not None and authenticator is None:
            raise ConfigError(
                "server_keys: they serve node authentication, which is off (no authorized_keys)"
            )
        self._require_client_certificate = require_client_certificate
        self._address = address
        self._rest_address = rest_address
        self._max_message_length = max_message_length
        self.certificates = (
            None
            if certificates is None
            else tuple(load_pem(f"certificates[{i}]", v) for i, v in enumerate(certificates))
        )
        self._credentials = (
            None
            if certificates is None
            else server_credentials(
                certificates, require_client_certificate=require_client_certificate
            )
        )
        self._loop_thread = LoopThread()
        self.fleet = Fleet(
            client_manager,
            self._loop_thread.loop,
            max_message_length=max_message_length,
            timing=timing,
            authenticator=authenticator,
            events=events,
        )
        self.flower = FlowerFleet(
            self.fleet,
            authenticator=(
                None
                if authenticator is None
                else FlowerAuthenticator(authenticator.keys, server_keys)
            ),
        )
        self._grpc: Any = None
        self._rest: RestListener | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None
        self.grpc_connection_limit = 0
        """Connections the gRPC listener takes at once (set by :meth:`start`)."""
        self.grpc_unused_per_peer = 0
        """Connections without a call the gRPC listener keeps per address (set by
        :meth:`start`)."""
        self.port: int = 0
        self.rest_port: int | None = None

    def start(self, timeout: float = 10.0) -> int:
        """Bind and start serving; return the bound gRPC port (see also ``rest_port``).

        Raises:
            ConfigError: an address cannot be bound (in use, or not an address here).
        """
        tune_allocator()
        tune_collector()  # rounds scale the cyclic GC with their nodes
        raise_descriptor_limit()
        self._loop_thread.start()
        try:
            self.port = self._loop_thread.run(self._start(), timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("serving grpc-bidi and grpc-rere on %s (port %d)", self._address, self.port)
        logger.info(
            "grpc: at most %d connections at once (FleetTiming.max_grpc_connections), %d "
            "without a call per address (FleetTiming.max_grpc_unused_per_peer)",
            self.grpc_connection_limit,
            self.grpc_unused_per_peer,
        )
        if self.rest_port is not None:
            logger.info("serving rest on %s (port %d)", self._rest_address, self.rest_port)
        logger.info(
            "Flower 1.12 nodes are served on the same port(s): flwr.proto.Fleet, /api/v0/fleet"
        )
        return self.port

    async def _start(self) -> int:
        timing = self.fleet.timing
        cap, unused_per_peer = timing.grpc_connection_limits(
            descriptor_limit(), rest=self._rest_address is not None
        )
        self.grpc_connection_limit, self.grpc_unused_per_peer = cap, unused_per_peer
        server = grpc.aio.server(
            options=server_options(self._max_message_length, timing.idle_limit, cap),
            maximum_concurrent_rpcs=None,
        )
        ledger = CallLedger()
        loop = asyncio.get_running_loop()
        handlers = (bidi_handler(self.fleet), rere_handler(self.fleet), flower_handler(self.flower))
        server.add_generic_rpc_handlers(tuple(tracked(h, ledger, loop.time) for h in handlers))
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self._address)
            else:
                port = server.add_secure_port(self._address, self._credentials)
        except RuntimeError as exc:
            raise ConfigError(
                f"server_address: cannot listen on {self._address!r} (in use, or not an "
                f"address of this machine): {exc}"
            ) from exc
        if not port:
            raise ConfigError(f"server_address: cannot listen on {self._address!r}")
        await server.start()
        self._grpc = server
        if self._rest_address is not None:
            await self._start_rest(self._rest_address)
        self._liveness = asyncio.create_task(self.fleet.watch_liveness())
        self._guard = asyncio.create_task(
            ConnectionGuard(int(port), cap, ledger, unused_per_peer).watch()
        )
        return int(port)

    async def _start_rest(self, address: str) -> None:
        host, port = split_host_port(address)
        context = None
        if self.certificates is not None:
            ca, cert, key = self.certificates
            # ssl reads a certificate chain from files only: write them privately, load, delete.
            with pem_files(cert, key) as (cert_file, key_file):
                context = RestListener.tls_context(
                    ca,
                    cert_file,
                    key_file,
                    require_client_certificate=self._require_client_certificate,
                )
        self._rest = RestListener(
            self.fleet,
            (host, port),
            max_body=self._max_message_length,
            ssl_context=context,
            flower=self.flower,
        )
        await self._rest.start()
        self.rest_port = self._rest.port

    def stop(self, grace: float = 2.0, timeout: float = 30.0) -> None:
        """Close every node, stop the listeners and the loop thread."""

        async def _stop() -> None:
            self.fleet.close_all("server stopped")
            for task in (self._liveness, self._guard):
                if task is not None:
                    task.cancel()
            if self._rest is not None:
                await self._rest.stop()
            if self._grpc is not None:
                await self._grpc.stop(grace)

        try:
            if not self._loop_thread.loop.is_closed() and self._loop_thread.loop.is_running():
                self._loop_thread.run(_stop(), timeout)
        finally:
            self._loop_thread.stop(timeout)
