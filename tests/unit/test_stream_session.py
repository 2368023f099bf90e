"""grpc-bidi session integrity (StreamSession), and a node's bounds on what a server says:
frame claims (FrameReader's bound, max_model_bytes) and long-poll timeouts."""

from __future__ import annotations

import base64
import itertools
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.poly1305 import Poly1305

from stamen.client.app import make_node_config
from stamen.errors import AuthError, ConfigError, DecodeError, ProtocolError
from stamen.memory import physical_memory_bytes
from stamen.protocol.auth import (
    HEADER_SESSION,
    MAC_TRAILER_BYTES,
    StreamSession,
    decode_session_key,
)
from stamen.protocol.fleet import CreateNodeResponse, PullResponse
from stamen.protocol.fleet_client import MAX_POLL_TIMEOUT, FleetClientState
from stamen.testing.conformance import AddClient
from stamen.transport.base import TransportSettings, default_max_model_bytes
from stamen.wire import FRAMING, FrameReader, Payload
from stamen.wire import frames as frames_module


def _pair() -> tuple[StreamSession, StreamSession]:
    node = StreamSession.for_node()
    server = StreamSession.for_server(node.public)
    node.accept(server.public)
    return node, server


def test_messages_travel_both_ways_and_arrive_unchanged() -> None:
    node, server = _pair()
    for i in range(3):
        assert server.open(node.seal(b"reply %d" % i)) == b"reply %d" % i
        assert node.open(server.seal(b"instruction %d" % i)) == b"instruction %d" % i


def _rfc8439_tag(key: bytes, seq: int, message: bytes) -> bytes:
    """The MAC of docs/protocol.md built from the primitives of RFC 8439 section 2.8:
    Poly1305 under the first 32 bytes of ChaCha20's block 0 (key, nonce ``0000 || seq``)
    over the message as additional data, its padding, and the two lengths."""
    nonce = bytes(4) + seq.to_bytes(8, "big")
    block0 = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), mode=None).encryptor()
    one_time = block0.update(bytes(32))
    data = message + bytes(-len(message) % 16) + len(message).to_bytes(8, "little") + bytes(8)
    return Poly1305.generate_tag(one_time, data)


def _keyed_pair() -> tuple[StreamSession, StreamSession, bytes, bytes]:
    """A node's and a server's session, and their (node-to-server, server-to-node) keys
    derived here as docs/protocol.md says: HKDF-SHA256 of the X25519 secret, info the
    label then the node's and the server's public keys."""
    node_private = X25519PrivateKey.generate()
    node = StreamSession(node_private, node=True)
    server = StreamSession.for_server(node.public)
    node.accept(server.public)
    shared = node_private.exchange(X25519PublicKey.from_public_bytes(server.public))
    okm = HKDF(
        hashes.SHA256(), 64, salt=None, info=b"stamen-bidi-session-v2" + node.public + server.public
    ).derive(shared)
    return node, server, okm[:32], okm[32:]


def test_the_trailer_is_field_1000_with_the_chacha20_poly1305_tag_of_the_message() -> None:
    """The exact bytes of docs/protocol.md: message || C2 3E 10 || the 16-byte
    ChaCha20-Poly1305 tag (empty plaintext, the message as additional data, nonce = 4 zero
    bytes and the sequence number)."""
    node, server, up, down = _keyed_pair()
    sealed = node.seal(b"m0")
    assert sealed[:2] == b"m0"
    assert sealed[2:5] == b"\xc2\x3e\x10"
    assert len(sealed) == 2 + MAC_TRAILER_BYTES == 2 + 19
    assert sealed[5:] == _rfc8439_tag(up, 0, b"m0")
    # The library's AEAD computes the same tag: an empty plaintext's ciphertext is the tag.
    assert sealed[5:] == ChaCha20Poly1305(up).encrypt(bytes(12), b"", b"m0")
    assert server.seal(b"i0")[5:] == _rfc8439_tag(down, 0, b"i0")
    long = bytes(range(256)) * 300 + b"odd"
    assert node.seal(long)[-16:] == _rfc8439_tag(up, 1, long)


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 100, 70_001])
def test_a_trailer_over_parts_is_the_trailer_of_the_joined_message(length: int) -> None:
    """Frames are MACed over the buffers they are joined from (Poly1305 fed part by
    part): the tag must be the one of the joined bytes, which the receiver checks."""
    node, server, up, _ = _keyed_pair()
    message = bytes((i * 7) % 251 for i in range(length))
    cuts = sorted({0, length // 3, length // 2, length})
    parts: list[bytes | memoryview] = [
        message[a:b] if i % 2 else memoryview(message)[a:b]
        for i, (a, b) in enumerate(itertools.pairwise(cuts))
    ] or [b"", b""]
    assert len(parts) > 1 or length == 1  # several parts: Poly1305 fed part by part
    trailer = node.trailer(parts)
    assert trailer[3:] == _rfc8439_tag(up, 0, message)
    assert bytes(server.open(message + trailer)) == message
    assert node.trailer([message])[3:] == _rfc8439_tag(up, 1, message)  # one part


def test_a_payload_sent_in_sealed_frames_is_opened_frame_by_frame() -> None:
    """messages(..., trailer) joins each frame with its MAC in one copy; the receiver
    opens each in order and the frame reader rebuilds the message."""
    node, server = _pair()
    data = bytes(range(256)) * 40
    payload = Payload([data[:1000], memoryview(data)[1000:7000], data[7000:]])
    plain = list(payload.messages(3000, 1024))
    sealed = list(payload.messages(3000, 1024, node.trailer))
    assert len(sealed) == len(plain) > 1
    reader = FrameReader(max_total=len(data))
    whole = None
    for frame, sealed_frame in zip(plain, sealed, strict=True):
        opened = server.open(sealed_frame)
        assert bytes(opened) == frame
        whole = reader.feed(opened)
    assert whole is not None and bytes(whole) == data
    # A whole message (it fits) gets its trailer too.
    small = Payload([b"ab", memoryview(b"cd")])
    (message,) = small.messages(100, trailer=node.trailer)
    assert bytes(server.open(message)) == b"abcd"
    with pytest.raises(AuthError, match="fails its MAC"):
        server.open(sealed[0])  # replayed


def test_the_trailer_is_a_valid_protobuf_field() -> None:
    """A sealed ClientMessage still parses as protobuf (an unknown field 1000): the MAC
    does not break anything that reads the message."""
    from stamen.wire import _fast

    node, _ = _pair()
    sealed = node.seal(b"\x0a\x00")  # field 1, empty
    fields = [(f, w) for f, w, *_ in _fast.split_fields(memoryview(sealed), 0, len(sealed))]
    assert fields == [(1, 2), (1000, 2)]


@pytest.mark.parametrize("attack", ["rewrite", "inject", "replay", "reorder", "reflect", "strip"])
def test_tampering_is_detected(attack: str) -> None:
    node, server = _pair()
    first, second = node.seal(b"first"), node.seal(b"second")
    if attack == "rewrite":
        tampered = [first.replace(b"first", b"fIrst")]
    elif attack == "inject":
        tampered = [b"forged" + first[-MAC_TRAILER_BYTES:]]
    elif attack == "replay":
        tampered = [first, first]
    elif attack == "reorder":
        tampered = [second]  # before first
    elif attack == "reflect":  # a server message sent back to the server
        tampered = [server.seal(b"first")]
    else:
        tampered = [b"first"]
    for message in tampered[:-1]:
        server.open(message)  # the untampered ones before it go through
    with pytest.raises(AuthError, match="MAC"):
        server.open(tampered[-1])


def test_a_message_of_another_stream_is_refused() -> None:
    node, _ = _pair()
    _, other_server = _pair()
    with pytest.raises(AuthError, match="fails its MAC"):
        other_server.open(node.seal(b"hello"))


def test_a_server_that_substitutes_its_key_cannot_speak_for_the_node() -> None:
    """A relay that answers the node with a session key of its own shares keys with the
    node, not with the server: what it relays from the node fails at the server."""
    node = StreamSession.for_node()
    server = StreamSession.for_server(node.public)
    relay = StreamSession.for_server(node.public)
    node.accept(relay.public)
    with pytest.raises(AuthError, match="fails its MAC"):
        server.open(node.seal(b"reply"))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, "expected the node's ephemeral session key"),
        ("!!", "not base64"),
        (base64.b64encode(b"x" * 31).decode(), "32 bytes"),
        ("A" * 100, "at most 64"),
    ],
)
def test_bad_session_key_headers_are_refused(value: str | None, match: str) -> None:
    with pytest.raises(AuthError, match=match):
        decode_session_key(value, "node")
    assert HEADER_SESSION == "x-stamen-session-key"


def test_seal_before_the_exchange_is_an_error() -> None:
    with pytest.raises(AuthError):
        StreamSession.for_node().seal(b"x")


# --- frame claims -----------------------------------------------------------------------


def test_frame_reader_refuses_a_claim_over_its_bound_before_allocating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_allocation(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("allocated")

    monkeypatch.setattr(frames_module.ReceivedBuffer, "allocate", no_allocation)
    frame = Payload.of(b"\x01" * 1001).frame(0, 10)
    reader = FrameReader(max_total=1000)
    with pytest.raises(DecodeError, match=r"1001 bytes announced.*1000 bytes"):
        reader.feed(frame)
    assert not reader.in_progress


def test_frame_reader_takes_a_message_at_its_bound() -> None:
    data = bytes(range(256)) * 4
    reader = FrameReader(max_total=len(data))
    payload = Payload.of(data)
    whole = None
    for message in payload.messages(100):
        whole = reader.feed(message)
    assert whole is not None and bytes(whole) == data


def test_default_max_model_bytes_is_half_the_memory_at_least_one_message() -> None:
    half = default_max_model_bytes(1)
    assert half == physical_memory_bytes() // 2
    assert default_max_model_bytes(half * 4) == half * 4
    assert TransportSettings("a:1", max_message_length=10).model_bound == half
    assert TransportSettings("a:1", 10, max_model_bytes=123).model_bound == 123


def _config(**kwargs: Any) -> Any:
    return make_node_config(server_address="127.0.0.1:1", client=AddClient(1).to_client(), **kwargs)


def test_max_model_bytes_reaches_the_transport_settings() -> None:
    config = _config(grpc_max_message_length=1000, max_model_bytes=5000)
    assert config.settings.max_model_bytes == 5000
    assert _config().settings.max_model_bytes is None


@pytest.mark.parametrize("value", [0, -1, 999, 1.5e9, "big", True])
def test_max_model_bytes_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError, match="max_model_bytes"):
        _config(grpc_max_message_length=1000, max_model_bytes=value)


def test_fleet_state_uses_the_bounded_reader() -> None:
    state = FleetClientState(FRAMING, 1000, FrameReader(max_total=2000))
    state.registered(CreateNodeResponse(5, 1.0, 1.0))
    frame = Payload.of(b"\x00" * 3000).frame(0, 500)
    with pytest.raises(DecodeError, match="over the 2000 bytes expected"):
        state.pulled(PullResponse(1, frame))


# --- long-poll timeouts ------------------------------------------------------------------


def test_a_server_poll_timeout_over_the_maximum_is_clamped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stamen.client")
    state = FleetClientState(FRAMING, 1000)
    state.registered(CreateNodeResponse(5, 15.0, 3600.0))
    assert MAX_POLL_TIMEOUT == 300.0
    assert state.poll_timeout == 300.0
    assert state.pull_timeout == 315.0
    assert "poll_timeout of 3600 s is over the node's maximum" in caplog.text


def test_a_poll_timeout_within_the_maximum_is_kept() -> None:
    state = FleetClientState(FRAMING, 1000)
    state.registered(CreateNodeResponse(5, 15.0, 300.0))
    assert state.poll_timeout == 300.0


def test_a_nonsense_poll_timeout_is_still_refused() -> None:
    with pytest.raises(ProtocolError, match="poll_timeout"):
        FleetClientState(FRAMING, 1000).registered(CreateNodeResponse(5, 15.0, 1e9))
