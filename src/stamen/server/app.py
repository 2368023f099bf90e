"""``start_server``: serve client nodes and run a strategy's rounds over them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ConfigError
from ..messages import DisconnectRes, Instruction, ReconnectIns
from ..net.address import parse_address
from ..net.limits import GRPC_MAX_MESSAGE_LENGTH
from .checkpoint import Checkpointer
from .client_manager import ClientManager, SimpleClientManager
from .client_proxy import ClientProxy
from .dashboard import start_dashboard
from .events import RunEvent
from .fleet.auth import AuthorizedKeys, NodeAuthenticator, ServerKeys
from .fleet.service import FleetService
from .history import History
from .progress import shown_run
from .server import Server, ServerConfig, run_instructions
from .sinks import make_sinks
from .strategy import Strategy

__all__ = ["end_run", "init_defaults", "make_authenticator", "run_server", "start_server"]

logger = logging.getLogger("stamen.server")


def init_defaults(
    server: Server | None,
    config: ServerConfig | None,
    strategy: Strategy | None,
    client_manager: ClientManager | None,
) -> tuple[Server, ServerConfig]:
    """Fill in Flower's defaults: a Server with FedAvg and a SimpleClientManager, 1 round."""
    if server is None:
        if client_manager is None:
            client_manager = SimpleClientManager()
        server = Server(client_manager=client_manager, strategy=strategy)
    elif strategy is not None:
        server.set_strategy(strategy)
    if config is None:
        config = ServerConfig()
    if not isinstance(config, ServerConfig):
        raise ConfigError(f"config: expected a ServerConfig, received {type(config).__name__}")
    return server, config


def make_authenticator(
    authorized_keys: Iterable[ec.EllipticCurvePublicKey] | str | os.PathLike[str] | None,
    window: float,
) -> NodeAuthenticator | None:
    """The request checker for ``authorized_keys`` (None when nodes are not authenticated)."""
    if authorized_keys is None:
        return None
    return NodeAuthenticator(AuthorizedKeys(authorized_keys), window)


def run_server(server: Server, config: ServerConfig) -> History:
    """Run the rounds, then tell every client the run is over: ``ReconnectIns(0)`` when
    it completed; when it failed, ``ReconnectIns(0)`` with the reason (Stamen nodes learn
    why; Flower nodes see a plain end of run)."""
    try:
        history, _ = server.fit(num_rounds=config.num_rounds, timeout=config.round_timeout)
    except BaseException as exc:
        end_run(server, f"{type(exc).__name__}: {exc}")
        raise
    server.disconnect_all_clients()
    return history


def end_run(server: Server, reason: str, timeout: float = 10.0) -> None:
    """Tell every connected client that the run failed, and why
    (``ReconnectIns(seconds=None, reason=reason)``); never raises."""
    clients = list(server.client_manager().all().values())
    instructions: list[tuple[ClientProxy, Instruction]] = [
        (c, ReconnectIns(seconds=None, reason=reason)) for c in clients
    ]
    try:
        _, failures = run_instructions(
            instructions, timeout, expect=DisconnectRes, log_level=logging.DEBUG
        )
    except Exception:  # the run's own error is the one that matters
        logger.debug("telling the clients that the run failed failed", exc_info=True)
        return
    if failures:
        logger.info("%d client(s) left without acknowledging the end of the run", len(failures))


def start_server(
    *,
    server_address: str = "[::]:8080",
    server: Server | None = None,
    config: ServerConfig | None = None,
    strategy: Strategy | None = None,
    client_manager: ClientManager | None = None,
    grpc_max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    certificates: tuple[bytes, bytes, bytes] | None = None,
    rest_address: str | None = None,
    require_client_certificate: bool = False,
    authorized_keys: Iterable[ec.EllipticCurvePublicKey] | str | os.PathLike[str] | None = None,
    auth_window: float = 60.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    server_keys: ServerKeys | None = None,
    dashboard_address: str | None = None,
    dashboard_token: str | None = None,
    # Seeing and recording the run (Stamen), kept together:
    subscribers: Sequence[Callable[[RunEvent], None]] = (),
    tensorboard_dir: str | os.PathLike[str] | None = None,
    mlflow_uri: str | None = None,
) -> History:
    """Serve client nodes on ``server_address`` and run the configured rounds.

    Args:
        server_address: ``host:port`` to listen on (gRPC: grpc-bidi and grpc-rere).
        server: A Server (default: one with ``strategy`` and ``client_manager``).
        config: Rounds and round timeout (default: ``ServerConfig()``, 1 round).
        strategy: The strategy (default: FedAvg); replaces the strategy of ``server``.
        client_manager: Default ``SimpleClientManager()``, which waits at most 600 s for
            clients (Flower: 24 h); pass ``SimpleClientManager(wait_timeout=...)`` to change.
        grpc_max_message_length: Bound of one gRPC message, both ways. Clients must use
            the same value.
        certificates: ``(ca_cert, server_cert, server_key)`` PEM bytes: serve TLS (on the
            gRPC port and the REST port).
        rest_address: ``host:port`` on which to serve the ``rest`` transport too (Stamen;
            default None: no REST). The gRPC port always serves grpc-bidi and grpc-rere.
        require_client_certificate: Mutual TLS (Stamen): refuse nodes that do not present
            a certificate signed by ``certificates[0]``; nodes pass theirs with
            ``start_client(client_certificates=...)``.
        authorized_keys: Node authentication (Stamen, every transport): the public keys
            allowed to connect, as keys or the path of a file of PEM / OpenSSH keys (read
            again when it changes). Nodes sign each request with ``authentication_keys``.
        auth_window: Seconds a signed request stays valid (and its nonce remembered).
        server_keys: ``(private_key, public_key)``, an elliptic-curve pair (Stamen): the
            server's key for Flower 1.12 nodes that authenticate (``authorized_keys`` set;
            Flower's scheme derives an HMAC key by ECDH with it, and the server sends the
            public key with CreateNode). Default None: a pair is generated at start, per
            curve the nodes use. Stamen nodes do not need it.
        checkpoint_dir: Crash safety (Stamen): after every round, the global parameters,
            round, History and strategy state are written atomically here; a server started
            again with the same folder resumes after the newest good checkpoint.
        dashboard_address: ``host:port`` (or ``PORT``: on 127.0.0.1) of a live, read-only
            web dashboard of the run (Stamen; ``docs/dashboard.md``), served for as long as
            the run lasts; its address is logged. Default None: no dashboard.
        dashboard_token: The token every dashboard request must carry (``?token=``).
            Default: ``STAMEN_DASHBOARD_TOKEN``, else none on a loopback address and a
            generated one, logged, on any other.
        subscribers: Callables subscribed to the run's events (``server.events``, see
            :mod:`stamen.server.events`) for the length of the run: a live view
            (:class:`stamen.server.live.LiveView`), a metrics sink, your own.
        tensorboard_dir: Write each round's losses and metrics as TensorBoard event files
            here (:class:`stamen.server.sinks.TensorBoardSink`; needs ``stamen[tensorboard]``).
        mlflow_uri: Log each round's losses and metrics to this MLflow tracking URI, e.g.
            ``file:./mlruns`` (:class:`stamen.server.sinks.MLflowSink`; needs
            ``stamen[mlflow]``).

    Returns:
        The run's :class:`History`. Every client is sent ``ReconnectIns(0)`` at the end, so
        their ``start_client`` returns.

    Raises:
        ConfigError: invalid arguments, or the address cannot be bound.
        NotEnoughClients: too few clients connected in time.
        RunError: the run failed (every client is told why before this is raised).
    """
    from ..memory import tune_allocator, tune_collector

    tune_allocator()  # process-wide malloc settings: entry points only, never at import
    tune_collector()  # and the cyclic GC's, scaled by each round's nodes
    parse_address(server_address)
    if rest_address is not None:
        parse_address(rest_address, field="rest_address")
    server, config = init_defaults(server, config, strategy, client_manager)
    if checkpoint_dir is not None:
        server.checkpointer = Checkpointer(checkpoint_dir)
        server.spill.directory = os.fspath(checkpoint_dir)  # spill files beside the run's
    service = FleetService(
        server.client_manager(),
        address=server_address,
        max_message_length=grpc_max_message_length,
        certificates=certificates,
        rest_address=rest_address,
        require_client_certificate=require_client_certificate,
        authenticator=make_authenticator(authorized_keys, auth_window),
        server_keys=server_keys,
        events=server.events,
    )
    service.fleet.spill_directory = server.spill.directory  # large results received there
    sinks = make_sinks(tensorboard_dir=tensorboard_dir, mlflow_uri=mlflow_uri)
    views: list[Callable[[RunEvent], None]] = [*subscribers, *sinks]
    unsubscribe = [server.events.subscribe(view) for view in views]
    with shown_run(server.events):  # progress on stderr when the program set up no logging
        dashboard = None
        try:
            # The dashboard subscribes before the fleet starts, so it sees every node join.
            if dashboard_address is not None:
                dashboard = start_dashboard(server.events, dashboard_address, token=dashboard_token)
            service.start()
            try:
                history = run_server(server, config)
            finally:
                service.stop()
            for sink in sinks:
                sink.write_history(history)  # centralized losses and metrics
            return history
        finally:
            service.stop()  # again, if it never started: this closes its event loop
            if dashboard is not None:
                dashboard.stop()
            for stop in unsubscribe:
                stop()
            for sink in sinks:
                sink.close()
