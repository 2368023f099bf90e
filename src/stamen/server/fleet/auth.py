"""Server side of node authentication: the authorized keys and the request check."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...errors import ConfigError
from ...protocol.auth import RequestVerifier, public_key_der

__all__ = ["AuthorizedKeys", "NodeAuthenticator", "parse_public_keys"]

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
        self._verifier = RequestVerifier(keys.lookup, window)
        self._lock = threading.Lock()

    def verify(self, method: str, body: bytes, headers: Mapping[str, str]) -> str:
        """Return the node key's fingerprint, or raise AuthError saying why not."""
        with self._lock:
            return self._verifier.verify(method, body, headers, time.time())
