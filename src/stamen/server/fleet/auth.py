"""Server side of node authentication: the authorized keys and the request check."""

from __future__ import annotations

import base64
import binascii
import hmac as std_hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...errors import AuthError, ConfigError
from ...protocol.auth import (
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    RequestVerifier,
    flower_hmac,
    flower_shared_key,
    key_fingerprint,
    public_key_der,
)

__all__ = [
    "FLOWER_AUTH_TOKEN_HEADER",
    "FLOWER_PUBLIC_KEY_HEADER",
    "AuthorizedKeys",
    "FlowerAuthenticator",
    "NodeAuthenticator",
    "ServerKeys",
    "opening_key_der",
    "parse_public_keys",
    "still_authorized",
]

logger = logging.getLogger("stamen.server")

_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def parse_public_keys(data: bytes, source: str = "keys") -> list[ec.EllipticCurvePublicKey]:
    """Parse PEM ``PUBLIC KEY`` blocks and OpenSSH ``ecdsa-sha2-*`` lines.

    Raises:
        ConfigError: a block or line is not an elliptic-curve public key.
    """
    keys: list[ec.EllipticCurvePublicKey] = []
    try:
        loaded: list[object] = [
            serialization.load_pem_public_key(m) for m in _PEM_BLOCK.findall(data)
        ]
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{source}: a PEM block is not a public key: {exc}") from exc
    remainder = _PEM_BLOCK.sub(b"", data)
    for number, raw in enumerate(remainder.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            loaded.append(serialization.load_ssh_public_key(line))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{source}: line {number} is not a public key: {exc}") from exc
    for key in loaded:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(
                f"{source}: expected elliptic-curve public keys, received {type(key).__name__}"
            )
        keys.append(key)
    return keys


class AuthorizedKeys:
    """The node public keys allowed to connect.

    Given as keys, or as the path of a file of PEM / OpenSSH public keys. A file is read
    again whenever its modification time changes, so keys can be added or revoked without
    restarting the server.
    """

    def __init__(
        self, source: Iterable[ec.EllipticCurvePublicKey] | str | os.PathLike[str]
    ) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._mtime: int | None = None
        self._by_der: dict[bytes, ec.EllipticCurvePublicKey] = {}
        if isinstance(source, str | os.PathLike):
            self._path = Path(source)
            self.reload()
        else:
            keys = list(source)
            for key in keys:
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise ConfigError(
                        "authorized_keys: expected EllipticCurvePublicKey items, received "
                        f"{type(key).__name__}"
                    )
            self._by_der = {public_key_der(k): k for k in keys}

    def __len__(self) -> int:
        return len(self._by_der)

    def reload(self) -> None:
        """Read the key file again.

        Raises:
            ConfigError: the file cannot be read or holds something that is not a key.
        """
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime_ns
            data = self._path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"authorized_keys: cannot read {self._path}: {exc.strerror}") from exc
        keys = parse_public_keys(data, str(self._path))
        with self._lock:
            self._by_der = {public_key_der(k): k for k in keys}
            self._mtime = mtime
        logger.info("loaded %d authorized node key(s) from %s", len(keys), self._path)

    def lookup(self, der: bytes) -> ec.EllipticCurvePublicKey | None:
        """The authorized key with this DER encoding, or None (reloading a changed file)."""
        if self._path is not None:
            try:
                changed = self._path.stat().st_mtime_ns != self._mtime
            except OSError:
                changed = False  # keep the last good keys while the file is being replaced
            if changed:
                try:
                    self.reload()
                except ConfigError as exc:
                    logger.error("keeping the previous authorized keys: %s", exc)
        with self._lock:
            return self._by_der.get(der)


class NodeAuthenticator:
    """Checks the signature headers of requests against the authorized keys (wall clock)."""

    def __init__(self, keys: AuthorizedKeys, window: float = 60.0) -> None:
        self.keys = keys
        self.window = window
        self._verifier = RequestVerifier(keys.lookup, window)
        self._lock = threading.Lock()

    def precheck(self, headers: Mapping[str, str], now: float | None = None) -> None:
        """Check what a request's headers alone say, before its body is read: the four
        headers are there and not oversized, the key is authorized, the timestamp within
        the window. :meth:`verify` checks the signature over the body later; this makes
        a request from anyone without an authorized key cost no body bytes.

        Raises:
            AuthError: why the request is refused.
        """
        texts = {}
        for name, limit in _PRECHECK_LIMITS.items():
            value = headers.get(name)
            if value is None:
                raise AuthError(f"authentication required: missing header {name}")
            if len(value) > limit:
                raise AuthError(
                    f"malformed authentication headers: {name}: expected at most {limit} "
                    f"characters, received {len(value)}"
                )
            texts[name] = value
        stamp = texts[HEADER_TIMESTAMP]
        if not stamp.isascii() or not stamp.isdigit():
            raise AuthError(f"malformed authentication headers: {HEADER_TIMESTAMP}: {stamp!r}")
        try:
            der = base64.b64decode(texts[HEADER_KEY], validate=True)
        except (ValueError, binascii.Error) as exc:
            raise AuthError(f"malformed authentication headers: {exc}") from None
        if self.keys.lookup(der) is None:
            raise AuthError("unknown node key: not in the authorized keys")
        skew = (time.time() if now is None else now) - int(stamp) / 1000
        if abs(skew) > self.window:
            raise AuthError(
                f"stale or future timestamp: {skew:+.1f} s from the server's clock "
                f"(window {self.window:g} s)"
            )

    def verify(self, method: str, body: bytes, headers: Mapping[str, str]) -> str:
        """Return the node key's fingerprint, or raise AuthError saying why not."""
        with self._lock:
            return self._verifier.verify(method, body, headers, time.time())


_PRECHECK_LIMITS = {
    HEADER_KEY: 1024,
    HEADER_TIMESTAMP: 16,
    HEADER_NONCE: 64,
    HEADER_SIGNATURE: 512,
}
"""Longest value of each authentication header (as ``protocol.auth`` bounds them)."""


# --- Flower 1.12's node authentication (grpc-rere) ------------------------------------------

FLOWER_PUBLIC_KEY_HEADER = "public-key"
"""gRPC metadata of every request of an authenticating Flower 1.12 node: URL-safe base64 of
its public key as PEM SubjectPublicKeyInfo. The server answers CreateNode with the same
key in its initial metadata, carrying the server's public key."""

FLOWER_AUTH_TOKEN_HEADER = "auth-token"
"""gRPC metadata of every request but CreateNode: URL-safe base64 of HMAC-SHA256 over the
request's deterministic serialization, keyed by the shared key (see
:func:`flower_shared_key`)."""

ServerKeys = tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]


def _pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class FlowerAuthenticator:
    """Checks Flower 1.12 nodes' authentication metadata on grpc-rere.

    A node sends its public key with every request; the key must be authorized (the
    same :class:`AuthorizedKeys` as Stamen nodes). CreateNode is answered with the
    server's public key (initial metadata ``public-key``); every later request carries an
    HMAC of its bytes under the ECDH-derived shared key (:func:`flower_shared_key`).
    Flower's scheme has no nonce or timestamp: a captured request can be replayed (see
    docs/security.md).

    Args:
        keys: The authorized node keys.
        server_keys: The server's key pair. None: one is generated per curve, on first
            use, so nodes on P-256, P-384 and P-521 all authenticate (ECDH needs the node's
            curve); with a given pair, nodes must use its curve.
    """

    def __init__(self, keys: AuthorizedKeys, server_keys: ServerKeys | None = None) -> None:
        self.keys = keys
        if server_keys is not None:
            private, public = server_keys
            if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
                public, ec.EllipticCurvePublicKey
            ):
                raise ConfigError(
                    "server_keys: expected (EllipticCurvePrivateKey, EllipticCurvePublicKey), "
                    f"received ({type(private).__name__}, {type(public).__name__})"
                )
            if public_key_der(private.public_key()) != public_key_der(public):
                raise ConfigError("server_keys: the public key is not the private key's")
        self._given = server_keys
        self._by_curve: dict[str, ServerKeys] = {}
        self._secrets: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def server_keys_for(self, curve: ec.EllipticCurve) -> ServerKeys:
        """The server's key pair that answers a node key on ``curve``.

        Raises:
            AuthError: server keys were given on another curve.
        """
        if self._given is not None:
            if self._given[0].curve.name != curve.name:
                raise AuthError(
                    f"the node's key is on {curve.name}, the server's key (server_keys) on "
                    f"{self._given[0].curve.name}: ECDH needs both on one curve"
                )
            return self._given
        with self._lock:
            pair = self._by_curve.get(curve.name)
            if pair is None:
                private = ec.generate_private_key(curve)
                pair = self._by_curve[curve.name] = (private, private.public_key())
            return pair

    def _node_key(self, headers: Mapping[str, str]) -> tuple[ec.EllipticCurvePublicKey, bytes]:
        encoded = headers.get(FLOWER_PUBLIC_KEY_HEADER)
        if not encoded:
            raise AuthError(
                f"node authentication is on: expected the node's key in metadata "
                f"{FLOWER_PUBLIC_KEY_HEADER!r} (Flower: start_client(authentication_keys=...))"
            )
        try:
            key = serialization.load_pem_public_key(base64.urlsafe_b64decode(encoded))
        except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error) as exc:
            raise AuthError(
                f"metadata {FLOWER_PUBLIC_KEY_HEADER!r}: expected URL-safe base64 of a PEM "
                f"public key: {exc}"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise AuthError(
                f"metadata {FLOWER_PUBLIC_KEY_HEADER!r}: expected an elliptic-curve key, "
                f"received {type(key).__name__}"
            )
        der = public_key_der(key)
        if self.keys.lookup(der) is None:
            raise AuthError(f"node key {key_fingerprint(key)[:16]} is not authorized")
        return key, der

    def precheck(self, headers: Mapping[str, str]) -> None:
        """Check, before the request is read, that it names an authorized key.

        Raises:
            AuthError: why the request is refused.
        """
        self._node_key(headers)

    def verify(
        self,
        creating: bool,
        body: bytes,
        canonical: Callable[[], bytes],
        headers: Mapping[str, str],
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Check one request; return the node key's fingerprint and the metadata to answer
        with (CreateNode: the server's public key).

        ``creating``: the request is a CreateNode (no HMAC yet). ``canonical``: the
        request's deterministic serialization, tried when the HMAC does not cover ``body``
        as it arrived.

        Raises:
            AuthError: why the request is refused.
        """
        key, der = self._node_key(headers)
        private, public = self.server_keys_for(key.curve)
        if creating:
            answer = base64.urlsafe_b64encode(_pem(public)).decode("ascii")
            return key_fingerprint(key), ((FLOWER_PUBLIC_KEY_HEADER, answer),)
        token = headers.get(FLOWER_AUTH_TOKEN_HEADER)
        if not token:
            raise AuthError(f"expected an HMAC in metadata {FLOWER_AUTH_TOKEN_HEADER!r}")
        try:
            received = base64.urlsafe_b64decode(token)
        except (ValueError, binascii.Error) as exc:
            raise AuthError(f"metadata {FLOWER_AUTH_TOKEN_HEADER!r}: not base64: {exc}") from exc
        with self._lock:
            shared = self._secrets.get(der)
        if shared is None:
            shared = flower_shared_key(private, key)
            with self._lock:
                self._secrets[der] = shared
        covers = std_hmac.compare_digest(flower_hmac(shared, body), received)
        if not covers and not std_hmac.compare_digest(flower_hmac(shared, canonical()), received):
            raise AuthError("the request's HMAC does not verify under the node's key")
        return key_fingerprint(key), ()


# --- Keys of open streams, checked again -------------------------------------------------


def opening_key_der(headers: Mapping[str, str]) -> bytes | None:
    """The DER of the node key named by a verified request's headers (None: not there)."""
    value = headers.get(HEADER_KEY)
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return None


def still_authorized(authenticator: NodeAuthenticator, key_der: bytes) -> bool:
    """Whether the key is (still) authorized: the authorized keys file is read again if it
    changed, so a key deleted from it is no longer authorized from the next check on."""
    return authenticator.keys.lookup(key_der) is not None
