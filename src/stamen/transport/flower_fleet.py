"""A Stamen node on Flower 1.12's Fleet API (a Flower SuperLink), and dialect detection.

:class:`FlowerFleetTransport` implements :class:`~stamen.transport.base.ClientTransport`
over a :class:`FlowerRequester` (one Flower Fleet call, one response): it is the IO shell
of :class:`~stamen.protocol.flower_client.FlowerClientState` (register, ping, poll,
GetRun, push, unregister). The gRPC and REST requesters live beside Stamen's own, in
``grpc_rere.py`` and ``rest.py``.

:class:`DetectingTransport` is what ``transport="grpc-rere"`` and ``transport="rest"``
build: it registers with Stamen's own Fleet protocol, and switches to Flower's Fleet API
when the server says it does not know Stamen's CreateNode (gRPC ``UNIMPLEMENTED``, or
``UNKNOWN`` from a Flower SuperLink with node authentication, whose interceptor fails on
methods it does not serve; HTTP 404 on ``POST /api/v0/stamen/fleet/create-node``). The
Flower session keeps the node's TLS settings; ``authentication_keys`` become Flower's own
node authentication on gRPC (:class:`FlowerNodeAuth`, logged as weaker) and are refused
on REST, where Flower 1.12 has none.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import AuthError, ConnectionLost, MessageTooLarge, NodeUnknown, StamenError
from ..messages import Instruction, Reply
from ..protocol.auth import (
    RequestSigner,
    flower_hmac,
    flower_public_key_header,
    flower_shared_key,
)
from ..protocol.flower_client import PING_CALL_TIMEOUT, Answer, FlowerClientState, Idle
from ..wire import FlowerCall, RefusedResult
from ..wire import flower_codec as codec
from .base import ClientTransport, refusal_notice

__all__ = [
    "PUBLIC_KEY_HEADER",
    "TOKEN_HEADER",
    "DetectingTransport",
    "FlowerFleetTransport",
    "FlowerNodeAuth",
    "FlowerRequester",
]

logger = logging.getLogger("stamen.client")

PUBLIC_KEY_HEADER = "public-key"
"""gRPC metadata of Flower 1.12's node authentication: the node's public key (on every
call), and the SuperLink's (in CreateNode's initial metadata). URL-safe base64 of the PEM
SubjectPublicKeyInfo."""

TOKEN_HEADER = "auth-token"
"""gRPC metadata of Flower 1.12's node authentication: URL-safe base64 of HMAC-SHA256 of
the deterministically serialized request, on every call but CreateNode."""

_PING_RETRY = 1.0


class FlowerRequester(Protocol):
    """Sends one call of Flower's Fleet API and returns the response body."""

    def open(self) -> None:
        """Reach the SuperLink (raises ConnectError when it cannot be reached)."""
        ...

    def call(self, call: FlowerCall, body: bytes, timeout: float) -> bytes:
        """Send ``body`` as ``call``; raise a mapped Stamen error on failure."""
        ...

    def close(self) -> None:
        """Release connections. Never raises."""
        ...


# --- Flower 1.12's node authentication -------------------------------------------------------


class FlowerNodeAuth:
    """Flower 1.12's node authentication, as a node does it (grpc-rere only).

    Every call carries the node's public key (:data:`PUBLIC_KEY_HEADER`); the SuperLink
    answers CreateNode with its own public key, from which both derive a shared key (ECDH,
    then HKDF-SHA256 to 32 bytes, no salt, no info; the key is that output in URL-safe
    base64). Every later call carries :data:`TOKEN_HEADER`, an HMAC-SHA256 under that key
    of the deterministically serialized request. No timestamp and no nonce: a recorded
    request is accepted again (docs/security.md).
    """

    def __init__(self, signer: RequestSigner) -> None:
        self._private: ec.EllipticCurvePrivateKey = signer.private_key
        self.public_key_header = flower_public_key_header(self._private.public_key())
        self._key: bytes | None = None

    def metadata(self, call: FlowerCall, body: bytes) -> tuple[tuple[str, str], ...]:
        """The metadata of one call whose (deterministic) body is ``body``.

        Raises:
            AuthError: a call other than CreateNode before the SuperLink's key is known.
        """
        if call is FlowerCall.CREATE_NODE:
            return ((PUBLIC_KEY_HEADER, self.public_key_header),)
        if self._key is None:
            raise AuthError(
                f"Flower node authentication: {call.method_name} before CreateNode gave the "
                "SuperLink's public key"
            )
        token = base64.urlsafe_b64encode(flower_hmac(self._key, body)).decode("ascii")
        return ((PUBLIC_KEY_HEADER, self.public_key_header), (TOKEN_HEADER, token))

    def superlink_key(self, header: str | bytes | None) -> None:
        """Take CreateNode's ``public-key`` initial metadata: derive the shared key.

        Raises:
            AuthError: no key, or not an elliptic-curve public key on the node's curve.
        """
        if not header:
            raise AuthError(
                "Flower node authentication: the SuperLink sent no public key with CreateNode "
                "(is node authentication enabled on it?)"
            )
        raw = header.encode("ascii") if isinstance(header, str) else header
        try:
            key = serialization.load_pem_public_key(base64.urlsafe_b64decode(raw))
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ValueError(f"expected an elliptic-curve key, received {type(key).__name__}")
            self._key = flower_shared_key(self._private, key)
        except (ValueError, TypeError) as exc:
            raise AuthError(f"Flower node authentication: bad SuperLink public key: {exc}") from exc


# --- the node ------------------------------------------------------------------------------


class FlowerFleetTransport:
    """A node of a Flower SuperLink (see ClientTransport): the IO shell of a
    :class:`~stamen.protocol.flower_client.FlowerClientState`.

    Args:
        requester: Sends Flower's Fleet calls (gRPC or REST).
        max_message_length: Bound of one message, both ways (Flower's API has no frames:
            a larger reply is refused with MessageTooLarge, and the node answers the task
            with an error instead).
        request_timeout: Seconds one call may take.
    """

    def __init__(
        self,
        requester: FlowerRequester,
        *,
        max_message_length: int,
        request_timeout: float = 30.0,
        now: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._requester = requester
        self._state = FlowerClientState(now, rng)
        self._max_message_length = max_message_length
        self._request_timeout = request_timeout
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None
        self._ping_error: StamenError | None = None

    @property
    def node_id(self) -> int:
        """The id the SuperLink assigned at registration."""
        return self._state.node_id

    def connect(self) -> None:
        """Reach the SuperLink, register this node and start pinging."""
        self._requester.open()
        self._register()

    def _register(self) -> None:
        body = codec.encode_create_node_request(self._state.create_request())
        response = self._requester.call(FlowerCall.CREATE_NODE, body, self._request_timeout)
        self._state.registered(codec.decode_create_node_response(response))
        self._stop.clear()
        self._ping_error = None
        self._pinger = threading.Thread(
            target=self._ping_loop, name=f"stamen-flower-ping-{self.node_id}", daemon=True
        )
        self._pinger.start()

    def _ping_loop(self) -> None:
        """Ping at Flower's cadence for as long as the node is registered."""
        delay = self._state.ping_delay()
        while not self._stop.wait(delay):
            request = self._state.ping_request()
            if request is None:
                return
            try:
                data = self._requester.call(
                    FlowerCall.PING, codec.encode_ping_request(request), PING_CALL_TIMEOUT
                )
                self._state.pinged(codec.decode_ping_response(data))
                delay = self._state.ping_delay()
            except NodeUnknown as exc:
                logger.warning("%s", exc)
                self._ping_error = exc
                return
            except StamenError as exc:  # the next pull reports a lasting failure
                logger.warning("ping failed: %s; pinging again in %.0f s", exc, _PING_RETRY)
                delay = _PING_RETRY

    def receive(self) -> Instruction:
        """Poll the SuperLink until it has a task this node can run."""
        state = self._state
        while True:
            if self._ping_error is not None:
                raise self._ping_error
            body = codec.encode_pull_task_ins_request(state.pull_request())
            data = self._requester.call(FlowerCall.PULL_TASK_INS, body, self._request_timeout)
            step = state.pulled(codec.decode_pull_task_ins_response(data))
            if isinstance(step, Idle):
                if self._stop.wait(step.delay):
                    raise ConnectionLost("node closed while waiting for a task")
                continue
            if isinstance(step, Answer):
                logger.warning("answering a task with an error: %s", step.reason)
                self._push(codec.encode_push_task_res_request(step.push))
                state.replied()
                continue
            if step.get_run is not None:
                data = self._requester.call(
                    FlowerCall.GET_RUN,
                    codec.encode_get_run_request(step.get_run),
                    self._request_timeout,
                )
                run = codec.decode_get_run_response(data)
                state.got_run(run)
                logger.info(
                    "serving run %s of the Flower SuperLink (fab %r %r)",
                    step.get_run.run_id,
                    run.run.fab_id,
                    run.run.fab_version,
                )
            return step.instruction

    def send(self, reply: Reply) -> None:
        """Push the reply to the task being answered.

        Raises:
            MessageTooLarge: the TaskRes is over ``max_message_length`` (nothing was sent;
                the task can still be answered, with an error).
        """
        body = codec.encode_push_task_res_request(self._state.reply_request(reply))
        if len(body) > self._max_message_length:
            raise MessageTooLarge(
                f"reply of {len(body)} bytes is over grpc_max_message_length="
                f"{self._max_message_length} (Flower's Fleet API has no frames)"
            )
        self._push(body)
        self._state.replied()

    def _push(self, body: bytes) -> None:
        self._requester.call(FlowerCall.PUSH_TASK_RES, body, self._request_timeout)

    def close(self, *, graceful: bool) -> None:
        """Stop pinging, unregister (best effort) and release connections."""
        self._stop.set()
        pinger = self._pinger
        if pinger is not None and pinger is not threading.current_thread():
            pinger.join(PING_CALL_TIMEOUT + 1.0)
        gone = self._state.delete_request()
        if gone is not None:
            body = codec.encode_delete_node_request(gone)
            try:
                self._requester.call(FlowerCall.DELETE_NODE, body, 5.0 if graceful else 2.0)
            except StamenError as exc:
                logger.info("could not unregister node %s: %s", gone.node.node_id, exc)
        self._state.unregistered()
        self._requester.close()


# --- which protocol the server speaks ----------------------------------------------------


class _Stamen(Protocol):
    """Stamen's own Fleet node, as detection sees it."""

    @property
    def node_id(self) -> int: ...

    @property
    def foreign_peer(self) -> str | None:
        """Why the server seems not to be a Stamen Fleet server (None: it is, or unknown)."""
        ...

    def connect(self) -> None: ...

    def receive(self) -> Instruction: ...

    def send(self, reply: Reply) -> None: ...

    def close(self, *, graceful: bool) -> None: ...


class DetectingTransport:
    """Stamen's Fleet protocol first, Flower's Fleet API when the server does not know it.

    Args:
        name: The transport's name, for the log (``"grpc-rere"``, ``"rest"``).
        address: The server's address, for the log.
        stamen: Stamen's Fleet node.
        flower: Builds the Flower node (it may refuse: ConfigError).
    """

    def __init__(
        self,
        name: str,
        address: str,
        stamen: _Stamen,
        flower: Callable[[], ClientTransport],
    ) -> None:
        self._name = name
        self._address = address
        self._stamen = stamen
        self._flower = flower
        self._active: ClientTransport | None = None
        self.dialect: str | None = None
        """``"stamen"`` or ``"flower"`` once connected."""

    @property
    def node_id(self) -> int:
        """The id the server assigned at registration."""
        return self._active.node_id if self._active is not None else 0

    def connect(self) -> None:
        """Register with Stamen's Fleet protocol, or else with Flower's Fleet API."""
        try:
            self._stamen.connect()
        except StamenError:
            why = self._stamen.foreign_peer
            if why is None:
                raise
            self._stamen.close(graceful=False)
            logger.info(
                "%s: %s answered %s to Stamen's CreateNode: speaking Flower 1.12's Fleet API",
                self._name,
                self._address,
                why,
            )
            flower = self._flower()
            try:
                flower.connect()
            except BaseException:
                flower.close(graceful=False)
                raise
            self._active = flower
            self.dialect = "flower"
            return
        logger.info("%s: %s speaks Stamen's Fleet protocol", self._name, self._address)
        self._active = self._stamen
        self.dialect = "stamen"

    def _link(self) -> ClientTransport:
        if self._active is None:
            raise ConnectionLost(f"{self._name}: not connected")
        return self._active

    def receive(self) -> Instruction:
        """The next instruction (see ClientTransport)."""
        return self._link().receive()

    def send(self, reply: Reply) -> None:
        """Send the reply to the last instruction."""
        self._link().send(reply)

    def refused_result(self) -> RefusedResult | None:
        """The refusal notice of the last instruction (Stamen's Fleet protocol only)."""
        return refusal_notice(self._active)

    def close(self, *, graceful: bool) -> None:
        """Close whichever link is open. Never raises."""
        active, self._active = self._active, None
        if active is not None:
            active.close(graceful=graceful)
        else:
            self._stamen.close(graceful=graceful)
