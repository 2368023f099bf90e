"""Run a real server in a background thread on a free port, for tests."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import Timeout
from ..net.limits import GRPC_MAX_MESSAGE_LENGTH
from ..server.app import init_defaults, make_authenticator, run_server
from ..server.client_manager import ClientManager
from ..server.fleet.handler import FleetTiming
from ..server.fleet.service import FleetService
from ..server.history import History
from ..server.server import Server, ServerConfig
from ..server.strategy import Strategy

__all__ = ["RunningServer", "running_server"]


@dataclass
class RunningServer:
    """A server started by :func:`running_server`."""

    host: str
    port: int
    server: Server
    service: FleetService
    rest_port: int | None = None
    _thread: threading.Thread | None = None
    _outcome: list[History | BaseException] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC port, for ``start_client`` (grpc-bidi, grpc-rere)."""
        return f"{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        """``http(s)://host:port`` of the REST port (``rest=True``)."""
        if self.rest_port is None:
            raise AttributeError("the server was started without rest=True")
        scheme = "http" if self.service.certificates is None else "https"
        return f"{scheme}://{self.host}:{self.rest_port}"

    def address_for(self, transport: str) -> str:
        """The address a node on ``transport`` connects to."""
        return self.rest_url if transport == "rest" else self.address

    def result(self, timeout: float) -> History:
        """Wait for the run to end; return its History or raise its error.

        Raises:
            Timeout: the run did not end within ``timeout`` seconds.
        """
        if not self._done.wait(timeout):
            raise Timeout(f"the server's run did not finish within {timeout:g} s")
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@contextmanager
def running_server(
    *,
    config: ServerConfig | None = None,
    strategy: Strategy | None = None,
    client_manager: ClientManager | None = None,
    server: Server | None = None,
    host: str = "127.0.0.1",
    grpc_max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    certificates: tuple[bytes, bytes, bytes] | None = None,
    rest: bool = False,
    timing: FleetTiming | None = None,
    port: int = 0,
    rest_port: int = 0,
    require_client_certificate: bool = False,
    authorized_keys: Iterable[ec.EllipticCurvePublicKey] | str | None = None,
    auth_window: float = 60.0,
    server_keys: tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey] | None = None,
    run: bool = True,
) -> Iterator[RunningServer]:
    """Serve on ``host`` (port 0: a free port) and, if ``run``, run the rounds in a thread.

    ``rest=True`` also serves the rest transport on its own port. ``port``/``rest_port``
    name fixed ports, to restart a server where its nodes expect it.

    On exit the listeners stop (so the run ends, clients get disconnected) and the thread
    is joined; nothing is left running.
    """
    server, config = init_defaults(server, config, strategy, client_manager)
    service = FleetService(
        server.client_manager(),
        address=f"{host}:{port}",
        max_message_length=grpc_max_message_length,
        certificates=certificates,
        rest_address=f"{host}:{rest_port}" if rest else None,
        timing=timing,
        require_client_certificate=require_client_certificate,
        authenticator=make_authenticator(authorized_keys, auth_window),
        server_keys=server_keys,
    )
    bound = service.start()
    handle = RunningServer(
        host=host, port=bound, server=server, service=service, rest_port=service.rest_port
    )

    def target() -> None:
        try:
            handle._outcome.append(run_server(server, config))
        except BaseException as exc:  # handed to the test through result()
            handle._outcome.append(exc)
        finally:
            handle._done.set()

    if run:
        handle._thread = threading.Thread(target=target, name="stamen-test-server", daemon=True)
        handle._thread.start()
    try:
        yield handle
    finally:
        service.stop()
        if handle._thread is not None:
            handle._thread.join(30)
