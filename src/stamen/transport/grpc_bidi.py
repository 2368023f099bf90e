"""grpc-bidi client transport: Flower's ``FlowerService/Join`` stream.

The server speaks first; each instruction is answered by one reply on the same stream.
Bytes go through the stream as they are (no grpc serializers): :mod:`stamen.wire` encodes
and decodes, so malformed bytes raise :class:`~stamen.errors.DecodeError`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from ..errors import ConnectError, ConnectionLost, MessageTooLarge
from ..messages import Instruction, Reply
from ..wire import (
    BIDI_JOIN_METHOD,
    FRAMES_METADATA,
    FrameReader,
    Payload,
    decode_instruction,
    encode_reply_payload,
    frame_size,
)
from ._errors import map_rpc_error
from ._tls import channel_credentials, diagnose_tls
from .base import TransportSettings

__all__ = ["GrpcBidiTransport", "channel_options", "open_channel", "wait_until_ready"]

_CLOSE_GRACE_SECONDS = 5.0


def channel_options(max_message_length: int) -> list[tuple[str, Any]]:
    """gRPC channel options shared by Stamen's gRPC client transports.

    Keepalive pings every 5.5 minutes detect a dead server without tripping the 5-minute
    ping policy of gRPC servers (Flower's included) that allow no pings without data.
    """
    return [
        ("grpc.max_send_message_length", max_message_length),
        ("grpc.max_receive_message_length", max_message_length),
        ("grpc.keepalive_time_ms", 330_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def wait_until_ready(channel: grpc.Channel, address: str, timeout: float) -> None:
    """Block until ``channel`` is READY.

    Raises:
        ConnectError: the channel failed to connect, or did not within ``timeout``.
    """
    done = threading.Event()
    outcome: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if (
            state
            in (
                grpc.ChannelConnectivity.READY,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            )
            and not done.is_set()
        ):
            outcome.append(state)
            done.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        if not done.wait(timeout):
            raise ConnectError(f"cannot reach {address}: no connection within {timeout:g} s")
    finally:
        channel.unsubscribe(watch)
    if outcome[0] is not grpc.ChannelConnectivity.READY:
        raise ConnectError(
            f"cannot reach {address}: connection failed (server down, wrong port, "
            "or a TLS/plaintext mismatch)"
        )


def open_channel(settings: TransportSettings) -> grpc.Channel:
    """A gRPC channel to ``settings.address``, READY.

    Raises:
        TLSError: the connection failed because of TLS (not retried).
        ConnectError: the server could not be reached.
    """
    options = channel_options(settings.max_message_length)
    if settings.secure:
        creds = channel_credentials(settings.root_certificates, settings.client_certificate)
        channel = grpc.secure_channel(settings.address, creds, options=options)
    else:
        channel = grpc.insecure_channel(settings.address, options=options)
    try:
        wait_until_ready(channel, settings.address, settings.connect_timeout)
    except ConnectError as exc:
        channel.close()
        diagnosis = diagnose_tls(
            settings.address,
            secure=settings.secure,
            root_certificates=settings.root_certificates,
            client_certificate=settings.client_certificate,
        )
        if diagnosis is not None:
            raise diagnosis from exc
        raise
    return channel


class GrpcBidiTransport:
    """Client side of the grpc-bidi stream (see :class:`~stamen.transport.base.ClientTransport`)."""

    def __init__(self, settings: TransportSettings) -> None:
        self._settings = settings
        self._address = settings.address
        self._max_message_length = settings.max_message_length
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._responses: Iterator[bytes] | None = None
        self._outbox: queue.Queue[Payload | None] = queue.Queue()
        self._reader = FrameReader()
        self._frame_size = frame_size(settings.max_message_length)
        self._server_frames: bool | None = None
        self._reply_frame_size = self._frame_size

    @property
    def node_id(self) -> int:
        """grpc-bidi streams carry no node identity: ``-1``, as in Flower."""
        return -1

    def connect(self) -> None:
        """Open the channel, wait until it is READY, and open the Join stream (signed, when
        the node authenticates)."""
        self._channel = open_channel(self._settings)
        join = self._channel.stream_stream(BIDI_JOIN_METHOD)
        metadata = [(FRAMES_METADATA, str(self._max_message_length))]
        if self._settings.signer is not None:
            headers = self._settings.signer.headers(BIDI_JOIN_METHOD, b"", time.time())
            metadata += headers.items()
        self._outbox = queue.Queue()
        self._reader = FrameReader()
        self._server_frames = None
        self._reply_frame_size = self._frame_size
        self._call = join(self._requests(self._outbox), metadata=tuple(metadata))
        self._responses = self._call

    def _requests(self, outbox: queue.Queue[Payload | None]) -> Iterator[bytes]:
        """The request stream: each queued reply, whole or in frames, produced only as
        gRPC takes them (a large reply is never copied whole)."""
        for payload in iter(outbox.get, None):
            if self._server_frames:
                yield from payload.messages(self._reply_frame_size)
            else:
                yield payload.tobytes()

    def receive(self) -> Instruction:
        """Wait for the server's next instruction."""
        if self._responses is None:
            raise ConnectionLost("grpc-bidi: receive() before connect()")
        whole = None
        while whole is None:
            try:
                data = next(self._responses)
            except StopIteration:
                raise ConnectionLost(f"grpc-bidi: {self._address} closed the stream") from None
            except grpc.RpcError as exc:
                raise map_rpc_error(exc, f"grpc-bidi stream to {self._address}") from exc
            whole = self._reader.feed(data)
        return decode_instruction(whole)

    def _peer_takes_frames(self) -> bool:
        """Whether the server said it understands frames (a Stamen server does, in its
        response metadata, which has arrived with the first instruction)."""
        if self._server_frames is None:
            metadata = self._call.initial_metadata() if self._call is not None else ()
            announced = dict(metadata or ()).get(FRAMES_METADATA)
            self._server_frames = isinstance(announced, str)
            if isinstance(announced, str) and announced.isdigit() and int(announced) > 0:
                self._reply_frame_size = min(self._frame_size, frame_size(int(announced)))
        return self._server_frames

    def send(self, reply: Reply) -> None:
        """Queue the reply on the request stream (in frames if it is large and the server
        takes frames).

        Raises:
            MessageTooLarge: the encoded reply exceeds ``grpc_max_message_length`` and the
                server does not take frames (a Flower server).
        """
        payload = encode_reply_payload(reply)
        if not self._peer_takes_frames() and len(payload) > self._max_message_length:
            raise MessageTooLarge(
                f"reply {type(reply).__name__} is {len(payload)} bytes, over "
                f"grpc_max_message_length={self._max_message_length}, and the server "
                "does not take messages in frames (a Flower server?)"
            )
        self._outbox.put(payload)

    def close(self, *, graceful: bool) -> None:
        """End the stream (after the queued reply, if ``graceful``) and close the channel."""
        call, channel = self._call, self._channel
        self._call = self._responses = self._channel = None
        self._outbox.put(None)  # ends the request iterator: half-close
        if call is not None:
            if graceful:
                finished = threading.Event()
                call.add_done_callback(lambda _call: finished.set())
                finished.wait(_CLOSE_GRACE_SECONDS)
            call.cancel()
        if channel is not None:
            channel.close()
