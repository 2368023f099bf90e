"""``start_client``: validate, pick the transport, run the node's session loop."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..clock import SystemClock
from ..context import Context, RecordSet
from ..errors import (
    ConfigError,
    ConnectError,
    MessageTooLarge,
    RunError,
    StamenError,
    TransportError,
)
from ..logger import shown_progress
from ..memory import tune_allocator
from ..messages import Code, DisconnectRes, ReconnectIns, Status
from ..net.address import parse_address, strip_scheme
from ..net.limits import GRPC_MAX_MESSAGE_LENGTH
from ..net.tls import load_pem
from ..protocol import Clock, NodeSession, RetryPolicy
from ..protocol.auth import RequestSigner
from ..transport import TransportFactory, transport_url_schemes
from ..transport import transport_factory as registered_factory
from ..transport.base import ClientTransport, TransportSettings, refusal_notice
from ..transport.probe import identify_peer
from .client import Client
from .dispatch import ClientFn, error_reply, handle, normalize_client_fn, received
from .numpy_client import NumPyClient

__all__ = ["GRPC_MAX_MESSAGE_LENGTH", "start_client"]

logger = logging.getLogger("stamen.client")

MAX_RECONNECT_SECONDS = 3600
"""The longest wait a server's ``ReconnectIns(seconds)`` can impose on a node (one hour):
a hostile or broken server could otherwise put a node to sleep for years, or crash it
with a value no clock can sleep."""


def reconnect_delay(seconds: int) -> float:
    """How long a node waits before it reconnects, when told to in ``seconds``: at most
    :data:`MAX_RECONNECT_SECONDS`, with a warning when the server asked for more."""
    if seconds > MAX_RECONNECT_SECONDS:
        logger.warning(
            "server asked to reconnect in %d s; waiting the maximum %d s instead",
            seconds,
            MAX_RECONNECT_SECONDS,
        )
        return float(MAX_RECONNECT_SECONDS)
    return float(max(seconds, 0))


@dataclass(frozen=True)
class NodeConfig:
    """Validated settings of one client node."""

    client_fn: ClientFn
    transport: str
    settings: TransportSettings
    policy: RetryPolicy
    factory: TransportFactory | None = None
    """Builds the transport; None: the one registered as ``transport`` (loaded on use)."""

    @property
    def address(self) -> str:
        """The server's address."""
        return self.settings.address


def _client_fn_from(client_fn: Callable[..., Any] | None, client: Client | None) -> ClientFn:
    if client_fn is None and client is None:
        raise ConfigError("Both `client_fn` and `client` are `None`, but one is required")
    if client_fn is not None and client is not None:
        raise ConfigError("Both `client_fn` and `client` are provided, but only one is allowed")
    if client_fn is not None:
        return normalize_client_fn(client_fn)
    if isinstance(client, NumPyClient):
        logger.warning("start_client: `client` is a NumPyClient; converting it with .to_client()")
        client = client.to_client()
    if not isinstance(client, Client):
        raise ConfigError(
            f"client: expected a Client or NumPyClient, received {type(client).__name__}"
        )
    fixed: Client = client
    return lambda _context: fixed


def make_node_config(
    *,
    server_address: str,
    client_fn: Callable[..., Any] | None = None,
    client: Client | None = None,
    grpc_max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    transport: str | None = None,
    authentication_keys: tuple[Any, Any] | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    client_certificates: tuple[bytes | str, bytes | str] | None = None,
    transport_factory: TransportFactory | None = None,
    max_model_bytes: int | None = None,
) -> NodeConfig:
    """Check every argument of :func:`start_client`; raise ConfigError naming the bad one.

    ``transport`` must be a registered transport (:mod:`stamen.transport`), unless
    ``transport_factory`` builds the transport instead (``transport`` then only names it).
    """
    fn = _client_fn_from(client_fn, client)
    factory = transport_factory
    if factory is None:
        transport = "grpc-bidi" if transport is None else transport
        schemes = transport_url_schemes(transport)  # ConfigError listing the registered ones
    else:
        if not callable(factory):
            raise ConfigError(
                f"transport_factory: expected a callable, received {type(factory).__name__}"
            )
        transport = "custom" if transport is None else transport
        schemes = ()
    if schemes and isinstance(server_address, str):
        scheme, host_port = strip_scheme(server_address)
        if scheme and scheme not in schemes:
            raise ConfigError(
                f"server_address: expected {', '.join(f'{s}://' for s in schemes)} or no "
                f"scheme for {transport}, received {server_address!r}"
            )
        parse_address(host_port)
        if scheme == "https" and insecure is True:
            raise ConfigError("server_address: https:// contradicts insecure=True")
    else:
        parse_address(server_address)
    if (
        isinstance(grpc_max_message_length, bool)
        or not isinstance(grpc_max_message_length, int)
        or grpc_max_message_length <= 0
    ):
        raise ConfigError(
            f"grpc_max_message_length: expected an int > 0, received {grpc_max_message_length!r}"
        )
    if max_model_bytes is not None and (
        isinstance(max_model_bytes, bool)
        or not isinstance(max_model_bytes, int)
        or max_model_bytes < grpc_max_message_length
    ):
        raise ConfigError(
            "max_model_bytes: expected None or an int >= grpc_max_message_length "
            f"({grpc_max_message_length}), received {max_model_bytes!r}"
        )
    if insecure is not None and not isinstance(insecure, bool):
        raise ConfigError(f"insecure: expected None or a bool, received {insecure!r}")
    if insecure is True and root_certificates is not None:
        raise ConfigError(
            "Invalid configuration: 'root_certificates' should not be provided when "
            "'insecure' is set to True"
        )
    roots = None if root_certificates is None else load_pem("root_certificates", root_certificates)
    secure = roots is not None or insecure is False or server_address.startswith("https://")
    client_pair: tuple[bytes, bytes] | None = None
    if client_certificates is not None:
        if not (isinstance(client_certificates, tuple) and len(client_certificates) == 2):
            raise ConfigError(
                "client_certificates: expected (certificate_chain, private_key) as PEM bytes "
                f"or paths, received {type(client_certificates).__name__}"
            )
        if not secure:
            raise ConfigError("client_certificates: mutual TLS needs TLS; insecure is True")
        client_pair = (
            load_pem("client_certificates[0]", client_certificates[0]),
            load_pem("client_certificates[1]", client_certificates[1]),
        )
    signer = None
    if authentication_keys is not None:
        if not (isinstance(authentication_keys, tuple) and len(authentication_keys) == 2):
            raise ConfigError(
                "authentication_keys: expected (private_key, public_key), received "
                f"{type(authentication_keys).__name__}"
            )
        signer = RequestSigner(*authentication_keys)
    policy = RetryPolicy(max_retries=max_retries, max_wait_time=max_wait_time)
    settings = TransportSettings(
        address=server_address,
        max_message_length=grpc_max_message_length,
        secure=secure,
        root_certificates=roots,
        client_certificate=client_pair,
        signer=signer,
        max_model_bytes=max_model_bytes,
    )
    return NodeConfig(
        client_fn=fn, transport=transport, settings=settings, policy=policy, factory=factory
    )


def make_transport(config: NodeConfig) -> ClientTransport:
    """Build the node's transport: ``config.factory``, or the one registered under
    ``config.transport`` (its module loads on first use)."""
    factory = config.factory if config.factory is not None else registered_factory(config.transport)
    return factory(config.settings)


_PROBED_TRANSPORTS = ("grpc-bidi", "grpc-rere")
"""Built-in transports whose failed connections are checked for a wrong peer."""


def _wrong_peer(config: NodeConfig, exc: TransportError) -> StamenError | None:
    """After a failed connection, the error naming a wrong peer at the address (an HTTP/1
    server, a TLS server reached in plaintext, another protocol), or None."""
    if (
        config.factory is not None
        or config.transport not in _PROBED_TRANSPORTS
        or config.settings.secure
        or not isinstance(exc, ConnectError)
    ):
        return None
    return identify_peer(config.address)


def _summary(message: object) -> str:
    """How a progress line names an instruction or a reply."""
    status: Status | None = getattr(message, "status", None)
    name = type(message).__name__
    if status is not None and status.code != Code.OK:
        return f"{name} ({status.code.name}: {status.message})"
    return name


def run_node(
    config: NodeConfig,
    *,
    clock: Clock,
    rng: Callable[[], float],
    transport_factory: Callable[[NodeConfig], ClientTransport] = make_transport,
) -> None:
    """Run the node until the server ends the session; reconnect under ``config.policy``.

    Logs its progress on ``stamen.client``: the server and transport reached, each
    instruction received and answered (with its duration), each reconnection and why,
    and how the run ended.

    Raises:
        RunError: the server ended the run as failed, and said why (Stamen servers do).
        ConnectError: reconnection was given up (``max_retries``/``max_wait_time``).
        TLSError, ProtocolError: a wrong peer at the address (TLS, HTTP/1, another
            protocol), found at once and not retried.
        ProtocolError, AuthError: errors that retrying cannot fix.
    """
    tune_allocator()
    session = NodeSession(config.policy, rng)
    context: Context | None = None
    attempts = 0
    answered = 0
    ended: ReconnectIns | None = None
    while True:
        transport = transport_factory(config)
        session.connect()
        attempts += 1
        try:
            transport.connect()
            session.connected()
            if attempts == 1:
                logger.info("connected to %s over %s", config.address, config.transport)
            else:
                logger.info(
                    "reconnected to %s over %s (attempt %d)",
                    config.address,
                    config.transport,
                    attempts,
                )
            while True:
                instruction = transport.receive()
                began = time.monotonic()
                _log_refusal(transport)
                session.instruction()
                if context is None:
                    # One Context per run: its state persists across the run's messages.
                    context = Context(
                        node_id=transport.node_id, node_config={}, state=RecordSet(), run_config={}
                    )
                if isinstance(instruction, ReconnectIns):
                    seconds = instruction.seconds or 0
                    # Always RECONNECT, byte for byte what a Flower node sends: a Flower
                    # server decodes any other reason (ACK included) as "UNKNOWN".
                    transport.send(DisconnectRes(reason="RECONNECT"))
                    come_back = session.reconnect(seconds)
                    transport.close(graceful=True)
                    if not come_back:
                        ended = instruction
                        break
                    wait = reconnect_delay(seconds)
                    logger.info("server asked to reconnect in %s s; waiting %g s", seconds, wait)
                    clock.sleep(wait)
                    attempts = 0
                    break
                logger.info("received %s", type(instruction).__name__)
                # The instruction is ours alone: its NumPy arrays need not be copied.
                reply = handle(config.client_fn, context, instruction, received(instruction))
                try:
                    transport.send(reply)
                except MessageTooLarge as exc:
                    logger.error("%s", exc)
                    reply = error_reply(instruction, str(exc))
                    transport.send(reply)
                session.replied()
                answered += 1
                logger.info(
                    "answered %s with %s in %.2f s",
                    type(instruction).__name__,
                    _summary(reply),
                    time.monotonic() - began,
                )
                # Not held while waiting for the next one: a large model's received
                # message and encoded reply can then serve the next round's.
                del instruction, reply
        except TransportError as exc:
            transport.close(graceful=False)
            probe = exc.retryable and transport_factory is make_transport
            wrong = _wrong_peer(config, exc) if probe else None
            if wrong is not None:
                session.fatal()
                raise wrong from exc
            if not exc.retryable:
                session.fatal()
                raise
            now = clock.monotonic()
            delay = session.link_failed(now)
            if delay is None:
                raise ConnectError(
                    f"gave up connecting to {config.address} after {session.failures} "
                    f"failed attempt(s) over {session.outage_seconds(now):.2f} s: {exc}"
                ) from exc
            logger.warning("%s; reconnecting in %.2f s", exc, delay)
            clock.sleep(delay)
        except BaseException:
            transport.close(graceful=False)
            session.fatal()
            raise
        if ended is not None:
            _run_ended(ended, answered)  # the session is over: raised out of its loop
            return


def _log_refusal(transport: ClientTransport) -> None:
    """Log what a Stamen server said beside the instruction: that it refused this node's
    fit result, and why (Flower servers say nothing)."""
    refused = refusal_notice(transport)
    if refused is not None:
        logger.warning(
            "the server refused this node's result of round %d: %s",
            refused.server_round,
            refused.reason,
        )


def _run_ended(instruction: ReconnectIns, answered: int) -> None:
    """Log how the run ended; raise RunError when the server said it failed."""
    if instruction.reason is None:
        logger.info(
            "run completed: the server ended the session after %d instruction(s); node shuts down",
            answered,
        )
        return
    logger.error("run failed on the server: %s", instruction.reason)
    raise RunError(f"the server ended the run as failed: {instruction.reason}")


def start_client(
    *,
    server_address: str,
    client_fn: Callable[..., Any] | None = None,
    client: Client | None = None,
    grpc_max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    transport: str | None = None,
    authentication_keys: tuple[Any, Any] | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    client_certificates: tuple[bytes | str, bytes | str] | None = None,
    max_model_bytes: int | None = None,
) -> None:
    """Start a client node that connects to a server and serves it until the run ends.

    Args:
        server_address: ``host:port`` or ``[ipv6]:port`` of the server.
        client_fn: Builds a :class:`Client` from a :class:`Context`; called once per message.
        client: A fixed client instead of ``client_fn`` (exactly one of the two).
        grpc_max_message_length: Largest message sent or received, in bytes.
        root_certificates: PEM bytes, or the path of a PEM file, of the CAs to trust;
            enables TLS.
        insecure: ``True`` for plaintext; ``False`` for TLS (with the system's CAs when
            ``root_certificates`` is None). Default: TLS exactly when certificates are given.
        transport: ``"grpc-bidi"`` (default), ``"grpc-rere"``, ``"rest"``, or the name of
            a transport added with :func:`stamen.transport.register_transport`.
        authentication_keys: ``(private_key, public_key)`` elliptic-curve keys (P-256,
            P-384 or P-521): every request is signed, on every transport (Flower: grpc-rere
            only, and without replay protection). See docs/security.md.
        max_retries: Consecutive failed connection attempts allowed; None is no limit.
        max_wait_time: Seconds allowed since the connection was lost; None is no limit.
        client_certificates: ``(certificate_chain, private_key)`` PEM bytes or paths: a
            client certificate for servers that require mutual TLS (Stamen extension).
        max_model_bytes: Largest instruction the node accepts, in bytes, including one
            that arrives in frames (Stamen extension: frames carry models larger than one
            message, so a server's frame could announce any size). A frame announcing
            more is refused (``DecodeError``) before anything is allocated. Default: half
            of this machine's physical memory (at least ``grpc_max_message_length``).
            Must be at least ``grpc_max_message_length``.

    Returns when the server ends the session (``ReconnectIns(seconds=0)``) after a run that
    completed, as Flower's does. When the program configured no logging, the node's
    progress (server reached, instructions answered, reconnections, the end of the run)
    shows on stderr at INFO while it runs.

    Raises:
        RunError: the server ended the run as failed (Stamen servers say so, and why: not
            enough clients, a strategy error, no round aggregated). A Flower server ends a
            failed run like a completed one, and ``start_client`` then returns.
        TLSError, ProtocolError: the address answers another protocol (a TLS server
            reached in plaintext, an HTTP/1 server, not gRPC): found within seconds, not
            retried.
        ConfigError (a ValueError): an invalid argument, before any I/O. Unlike Flower,
            a bad address never raises SystemExit.
        ConnectError: the server stayed unreachable past ``max_retries``/``max_wait_time``.
            Unlike Flower, the limits hold on grpc-bidi too, and giving up raises instead of
            returning silently.
    """
    config = make_node_config(
        server_address=server_address,
        client_fn=client_fn,
        client=client,
        grpc_max_message_length=grpc_max_message_length,
        root_certificates=root_certificates,
        insecure=insecure,
        transport=transport,
        authentication_keys=authentication_keys,
        max_retries=max_retries,
        max_wait_time=max_wait_time,
        client_certificates=client_certificates,
        max_model_bytes=max_model_bytes,
    )
    with shown_progress():  # INFO progress on stderr when the program set up no logging
        run_node(config, clock=SystemClock(), rng=random.random)
