"""grpc-bidi client transport: Flower's ``FlowerService/Join`` stream.

The server speaks first; each instruction is answered by one reply on the same stream.
Bytes go through the stream as they are (no grpc serializers): :mod:`stamen.wire` encodes
and decodes, so malformed bytes raise :class:`~stamen.errors.DecodeError`.

With ``authentication_keys`` the signed opening carries an ephemeral session key, and
every message either way carries a MAC (:class:`~stamen.protocol.auth.StreamSession`): a
message from the server that fails it raises :class:`~stamen.errors.AuthError`, and so
does a server that does not take part (a Flower server, whose grpc-bidi has no node
authentication, or a proxy that removed the server's key).

The node announces ``stamen-heartbeat``; a Stamen server that answers with its heartbeat
interval gets a heartbeat message (:data:`~stamen.wire.HEARTBEAT_MESSAGE`, MACed like any
other) every interval while the node works on an instruction, from :meth:`receive`
returning it until :meth:`send` writes the reply, so a node training for longer than the
server's silence limit is not taken for a silent one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc import aio

from ..errors import AuthError, ConnectError, ConnectionLost, MessageTooLarge, ProtocolError
from ..messages import Instruction, Reply
from ..net.limits import grpc_message_options
from ..net.loop import post_on_client_loop, run_on_client_loop
from ..net.tls import channel_credentials, diagnose_tls
from ..protocol.auth import HEADER_SESSION, StreamSession, decode_session_key
from ..protocol.fleet_client import MIN_SERVER_MESSAGE_LENGTH, SERVER_SECONDS
from ..wire import (
    BIDI_JOIN_METHOD,
    FRAMES_METADATA,
    HEARTBEAT_MESSAGE,
    HEARTBEAT_METADATA,
    FrameReader,
    RefusedResult,
    decode_server_message,
    encode_reply_payload,
    frame_size,
)
from ._errors import map_rpc_error
from .base import TransportSettings

__all__ = ["GrpcBidiTransport", "channel_options", "open_channel"]

logger = logging.getLogger("stamen.client")

_CLOSE_GRACE_SECONDS = 5.0


def channel_options(max_message_length: int) -> list[tuple[str, Any]]:
    """gRPC channel options shared by Stamen's gRPC client transports.

    Keepalive pings every 5.5 minutes detect a dead server without tripping the 5-minute
    ping policy of gRPC servers (Flower's included) that allow no pings without data.
    """
    return [
        *grpc_message_options(max_message_length),
        ("grpc.keepalive_time_ms", 330_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def open_channel(settings: TransportSettings) -> aio.Channel:
    """A ``grpc.aio`` channel to ``settings.address`` on the client loop, READY.

    Raises:
        TLSError: the connection failed because of TLS (not retried).
        ConnectError: the server could not be reached.
    """
    try:
        return run_on_client_loop(_open_channel(settings))
    except ConnectError as exc:
        diagnosis = diagnose_tls(
            settings.address,
            secure=settings.secure,
            root_certificates=settings.root_certificates,
            client_certificate=settings.client_certificate,
        )
        if diagnosis is not None:
            raise diagnosis from exc
        raise


async def _open_channel(settings: TransportSettings) -> aio.Channel:
    options = channel_options(settings.max_message_length)
    if settings.secure:
        creds = channel_credentials(settings.root_certificates, settings.client_certificate)
        channel = aio.secure_channel(settings.address, creds, options=options)
    else:
        channel = aio.insecure_channel(settings.address, options=options)
    try:
        await _until_ready(channel, settings.address, settings.connect_timeout)
    except BaseException:
        await channel.close()
        raise
    return channel


async def _until_ready(channel: aio.Channel, address: str, timeout: float) -> None:
    """Wait until ``channel`` is READY; fail fast when it fails to connect.

    Raises:
        ConnectError: the channel failed to connect, or did not within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            raise ConnectError(
                f"cannot reach {address}: connection failed (server down, wrong port, "
                "or a TLS/plaintext mismatch)"
            )
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            raise ConnectError(
                f"cannot reach {address}: no connection within {timeout:g} s"
            ) from None
        state = channel.get_state(try_to_connect=True)


class GrpcBidiTransport:
    """Client side of the grpc-bidi stream (see :class:`~stamen.transport.base.ClientTransport`).

    The stream lives on the process's client event loop (:mod:`stamen.net.loop`); the node's
    thread waits on it without polling, and does the CPU work (frames, decoding) itself.
    """

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._address = settings.address
        self._max_message_length = settings.max_message_length
        self._channel: aio.Channel | None = None
        self._call: Any = None
        self._reader = FrameReader(settings.model_bound)
        self._frame_size = frame_size(settings.max_message_length)
        self._server_frames: bool | None = None
        self._refused: RefusedResult | None = None
        self._reply_frame_size = self._frame_size
        self._session: StreamSession | None = None
        self._heartbeat_interval: float | None = None
        self._beats: _Heartbeats | None = None

    @property
    def node_id(self) -> int:
        """grpc-bidi streams carry no node identity: ``-1``, as in Flower."""
        return -1

    def connect(self) -> None:
        """Open the channel, wait until it is READY, and open the Join stream (signed, when
        the node authenticates).

        Raises:
            TLSError: the connection failed because of TLS (not retried).
            ConnectError: the server could not be reached.
        """
        metadata = [
            (FRAMES_METADATA, str(self._max_message_length)),
            (HEARTBEAT_METADATA, "1"),
        ]
        session = None
        if self._settings.signer is not None:
            # The signature covers the session key: the opening's body is its 32 bytes.
            session = StreamSession.for_node()
            headers = self._settings.signer.headers(BIDI_JOIN_METHOD, session.public, time.time())
            metadata += headers.items()
            metadata.append((HEADER_SESSION, session.header_value))
        channel = open_channel(self._settings)
        self._channel = channel  # closed by close(), whatever happens next
        self._call = run_on_client_loop(_join(channel, tuple(metadata)))
        self._reader = FrameReader(self._settings.model_bound)
        self._server_frames = None
        self._reply_frame_size = self._frame_size
        self._session = session
        self._heartbeat_interval = None
        self._beats = None

    def receive(self) -> Instruction:
        """Wait for the server's next instruction."""
        call = self._call
        if call is None:
            raise ConnectionLost("grpc-bidi: receive() before connect()")
        beats, self._beats = self._beats, None  # stopped on the loop, before the read
        whole = None
        while whole is None:
            data = run_on_client_loop(self._read(call, beats))
            beats = None
            # Reads the server's session key and heartbeat interval, once.
            self._peer_takes_frames(call)
            message = data if self._session is None else self._opened(data)
            whole = self._reader.feed(message)  # copying a frame: here, not on the loop
        instruction, self._refused = decode_server_message(whole)
        interval, session = self._heartbeat_interval, self._session
        if interval is not None:
            # Started on the loop without waiting here: the next hop (the reply's first
            # write, or the next read) runs after it and stops them first.
            beats = self._beats = _Heartbeats()
            post_on_client_loop(
                lambda: beats.start(self._beat(call, interval, beats.stopped, session))
            )
        return instruction

    def refused_result(self) -> RefusedResult | None:
        """The refusal notice that came with the last instruction (a Stamen server's)."""
        return self._refused

    async def _beat(
        self, call: Any, interval: float, stop: asyncio.Event, session: StreamSession | None
    ) -> None:
        """Write a heartbeat every ``interval`` seconds until ``stop`` is set. Never
        cancelled mid-write: a heartbeat sealed is a heartbeat sent (the MAC's sequence
        numbers stay in step)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
                return
            message = HEARTBEAT_MESSAGE if session is None else session.seal(HEARTBEAT_MESSAGE)
            try:
                await call.write(message)
            except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                # The stream has ended: receive() or send() will say so.
                logger.debug("grpc-bidi: heartbeat to %s: %s", self._address, exc)
                return

    def _stop_beats(self) -> None:
        """Stop the heartbeats now (before the stream closes, or before a message is
        sealed: a heartbeat sealed after it would reach the server out of sequence)."""
        beats, self._beats = self._beats, None
        if beats is not None:
            run_on_client_loop(beats.stop())

    def _opened(self, data: bytes) -> memoryview:
        """A message of the server checked against its MAC, without it.

        Raises:
            AuthError: the MAC does not verify.
        """
        session = self._session
        assert session is not None
        try:
            return session.open(data)
        except AuthError as exc:
            raise AuthError(f"grpc-bidi stream to {self._address}: {exc}") from None

    async def _read(self, call: Any, beats: _Heartbeats | None = None) -> bytes:
        if beats is not None:
            await beats.stop()
        try:
            data = await call.read()
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, f"grpc-bidi stream to {self._address}") from exc
        if data is aio.EOF:
            raise ConnectionLost(f"grpc-bidi: {self._address} closed the stream")
        assert isinstance(data, bytes)
        return data

    def _peer_takes_frames(self, call: Any) -> bool:
        """Whether the server said it understands frames (a Stamen server does, in its
        response metadata, which has arrived with the first instruction)."""
        if self._server_frames is None:
            metadata = run_on_client_loop(call.initial_metadata())
            announced = server_key = None
            for key, value in metadata or ():
                if key == FRAMES_METADATA:
                    announced = value
                elif key == HEADER_SESSION and isinstance(value, str):
                    server_key = value
            if self._session is not None and not self._session.ready:
                if announced is None:
                    raise AuthError(
                        f"grpc-bidi: {self._address} does not take part in node "
                        "authentication on grpc-bidi (a Flower server? Flower 1.12 has none "
                        "on grpc-bidi: use transport='grpc-rere' with authentication_keys, or "
                        "no authentication_keys)"
                    )
                if server_key is None:
                    # A Stamen server without node authentication: it ignores the
                    # signature (as on grpc-rere and rest) and MACs nothing. (A relay that
                    # removed the key gains nothing: the server, expecting MACs, refuses
                    # every message of ours.)
                    logger.debug("grpc-bidi: %s does not authenticate nodes", self._address)
                    self._session = None
                else:
                    try:
                        self._session.accept(decode_session_key(server_key, "server"))
                    except AuthError as exc:
                        raise AuthError(f"grpc-bidi stream to {self._address}: {exc}") from None
            self._server_frames = isinstance(announced, str)
            if self._server_frames:
                self._heartbeat_interval = _heartbeat_seconds(
                    self._address, _metadata_value(metadata, HEARTBEAT_METADATA)
                )
            if _byte_count(announced) > 0:
                bound = _byte_count(announced)
                if bound < MIN_SERVER_MESSAGE_LENGTH:
                    raise ProtocolError(
                        f"grpc-bidi: {self._address} announced {FRAMES_METADATA}: {bound}: "
                        f"expected at least {MIN_SERVER_MESSAGE_LENGTH} bytes"
                    )
                self._reply_frame_size = min(self._frame_size, frame_size(bound))
        return self._server_frames

    def send(self, reply: Reply) -> None:
        """Write the reply on the request stream (in frames if it is large and the server
        takes frames); returns once gRPC has taken the last message.

        Raises:
            MessageTooLarge: the encoded reply exceeds ``grpc_max_message_length`` and the
                server does not take frames (a Flower server).
            ConnectionLost: the stream ended.
        """
        call = self._call
        if call is None:
            raise ConnectionLost("grpc-bidi: send() before connect()")
        session = self._session
        if session is not None:
            self._stop_beats()  # before the reply is sealed (sequence numbers in order)
        stamen_server = self._peer_takes_frames(call)
        if not stamen_server:
            reply = _for_flower_server(reply)
        payload = encode_reply_payload(reply)
        # Unsealed messages: the heartbeats stop on the loop, in the first write's hop.
        beats, self._beats = self._beats, None
        if not stamen_server:  # (which announced no heartbeats: ``beats`` is None)
            if len(payload) > self._max_message_length:
                raise MessageTooLarge(
                    f"reply {type(reply).__name__} is {len(payload)} bytes, over "
                    f"grpc_max_message_length={self._max_message_length}, and the server "
                    "does not take messages in frames (a Flower server?)"
                )
            run_on_client_loop(self._write(call, payload.tobytes(), beats))
            return
        trailer = None if session is None else session.trailer
        for message in payload.messages(self._reply_frame_size, trailer=trailer):
            run_on_client_loop(self._write(call, message, beats))  # built in this thread
            beats = None

    async def _write(self, call: Any, message: bytes, beats: _Heartbeats | None = None) -> None:
        if beats is not None:
            await beats.stop()
        try:
            await call.write(message)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, f"grpc-bidi stream to {self._address}") from exc
        except asyncio.InvalidStateError as exc:  # the call has already ended
            raise ConnectionLost(f"grpc-bidi: {self._address} closed the stream") from exc

    def close(self, *, graceful: bool) -> None:
        """End the stream (half-close and wait for the server to end it, if ``graceful``)
        and close the channel. Never raises."""
        with contextlib.suppress(Exception):
            self._stop_beats()
        call, channel = self._call, self._channel
        self._call = self._channel = None
        if call is None and channel is None:
            return
        try:
            run_on_client_loop(_close(call, channel, graceful), _CLOSE_GRACE_SECONDS + 5.0)
        except Exception as exc:  # closing is best effort
            logger.debug("grpc-bidi: closing the stream to %s: %s", self._address, exc)


def _byte_count(value: str | None) -> int:
    """A byte count announced in metadata (0: none, or not a plain decimal number of at
    most 19 digits: ``int()`` would take Unicode digits, and raise on 5000 of them)."""
    if value is None or not (value.isascii() and value.isdigit() and len(value) <= 19):
        return 0
    return int(value)


def _metadata_value(metadata: Any, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name and isinstance(value, str):
            return value
    return None


def _heartbeat_seconds(address: str, value: str | None) -> float | None:
    """The heartbeat interval a Stamen server announced (None: it asks for none).

    Raises:
        ProtocolError: not a number of seconds in [0.01, 3600] (heartbeats in a busy loop,
            or none for an hour).
    """
    if value is None:
        return None
    low, high = SERVER_SECONDS
    try:
        seconds = float(value) if value.isascii() and len(value) <= 32 else math.nan
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and low <= seconds <= high):
        raise ProtocolError(
            f"grpc-bidi: {address} announced {HEARTBEAT_METADATA}: {value[:40]!r}: expected "
            f"seconds in [{low:g}, {high:g}]"
        )
    return seconds


class _Heartbeats:
    """A node's heartbeats while it works on an instruction, run by a task on the client
    loop. Started by a callback posted there, stopped within the node's next hop to the
    loop (its reply's first write, or its next read): no hop of their own."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()  # bound to the loop only when first waited on
        self._task: asyncio.Task[None] | None = None

    def start(self, beat: Coroutine[Any, Any, None]) -> None:
        """Run ``beat`` (on the loop; it returns once :attr:`stopped` is set)."""
        if self.stopped.is_set():
            beat.close()
            return
        self._task = asyncio.ensure_future(beat)

    async def stop(self) -> None:
        """Stop them and wait for a heartbeat being written to finish (on the loop)."""
        self.stopped.set()
        if self._task is not None:
            await self._task


def _for_flower_server(reply: Reply) -> Reply:
    """``reply`` with a status code a Flower 1.12 server reads as it is meant.

    Flower 1.12 reads Stamen's ``CLIENT_ERROR`` (5) as OK: a failed fit would count as a
    result with no parameters and 0 examples (the global model becomes ``[]``; with every
    node failing, FedAvg divides by zero). Towards a Flower server (one that did not
    announce frames) a ``CLIENT_ERROR`` reply therefore carries the ``*_NOT_IMPLEMENTED``
    code of its kind, which Flower counts as exactly one failure of the round while the
    stream, and the model, stay as they are (see
    :func:`stamen.protocol.flower_fleet.reply_for_flower_peer` and docs/protocol.md,
    "Status codes towards Flower peers"). Towards a Stamen server CLIENT_ERROR stays.
    """
    from ..protocol.flower_fleet import reply_for_flower_peer

    return reply_for_flower_peer(reply)


async def _join(channel: aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Any:
    """Open the Join stream (an aio call is made on the loop it runs on)."""
    return channel.stream_stream(BIDI_JOIN_METHOD)(metadata=metadata)


async def _close(call: Any, channel: aio.Channel | None, graceful: bool) -> None:
    if call is not None:
        if graceful:
            with contextlib.suppress(Exception):
                await call.done_writing()
                await asyncio.wait_for(call.code(), _CLOSE_GRACE_SECONDS)
        call.cancel()
    if channel is not None:
        await channel.close()
