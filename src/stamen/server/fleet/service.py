"""The server's listeners: one event loop thread, one gRPC server, one fleet."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from ...errors import ConfigError
from ...transport._tls import server_credentials
from ..client_manager import ClientManager
from .grpc_bidi import bidi_handler
from .handler import Fleet
from .loop import LoopThread

__all__ = ["FleetService", "server_options"]

logger = logging.getLogger("stamen.server")


def server_options(max_message_length: int) -> list[tuple[str, Any]]:
    """gRPC server options.

    The server pings idle streams every 60 s and drops a node that does not answer within
    20 s, so a vanished grpc-bidi node fails its instruction without waiting for
    ``round_timeout``. ``so_reuseport`` is off, so a port already in use is an error, not
    a second server silently sharing it.
    """
    return [
        ("grpc.max_send_message_length", max_message_length),
        ("grpc.max_receive_message_length", max_message_length),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class FleetService:
    """Starts and stops everything that serves client nodes.

    Args:
        client_manager: Where connecting nodes are registered.
        address: ``host:port`` of the gRPC listener (port 0 picks a free one).
        max_message_length: Bound of one gRPC message, both ways.
        certificates: ``(ca_cert, server_cert, server_key)`` PEM bytes for TLS, or None.
    """

    def __init__(
        self,
        client_manager: ClientManager,
        *,
        address: str,
        max_message_length: int,
        certificates: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self._address = address
        self._max_message_length = max_message_length
        self._credentials = None if certificates is None else server_credentials(certificates)
        self._loop_thread = LoopThread()
        self.fleet = Fleet(
            client_manager, self._loop_thread.loop, max_message_length=max_message_length
        )
        self._grpc: Any = None
        self.port: int = 0

    def start(self, timeout: float = 10.0) -> int:
        """Bind and start serving; return the bound gRPC port.

        Raises:
            ConfigError: the address cannot be bound (in use, or not an address here).
        """
        self._loop_thread.start()
        try:
            self.port = self._loop_thread.run(self._start(), timeout)
        except BaseException:
            self._loop_thread.stop()
            raise
        logger.info("serving grpc-bidi on %s (port %d)", self._address, self.port)
        return self.port

    async def _start(self) -> int:
        server = grpc.aio.server(
            options=server_options(self._max_message_length), maximum_concurrent_rpcs=None
        )
        server.add_generic_rpc_handlers((bidi_handler(self.fleet),))
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
        return int(port)

    def stop(self, grace: float = 2.0, timeout: float = 10.0) -> None:
        """Close every node, stop the listeners and the loop thread."""

        async def _stop() -> None:
            self.fleet.close_all("server stopped")
            if self._grpc is not None:
                await self._grpc.stop(grace)

        try:
            if not self._loop_thread.loop.is_closed():
                self._loop_thread.run(_stop(), timeout)
        finally:
            self._loop_thread.stop(timeout)
