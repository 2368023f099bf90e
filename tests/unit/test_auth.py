"""Node authentication: signing, verification, replay window, authorized keys (no sockets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from stamen.errors import AuthError, ConfigError
from stamen.protocol.auth import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    RequestSigner,
    RequestVerifier,
    public_key_der,
)
from stamen.server.fleet.auth import AuthorizedKeys, parse_public_keys
from stamen.testing import generate_node_keys

NOW = 1_800_000_000.0


def _pair(curve: ec.EllipticCurve) -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    return generate_node_keys(curve)


def _verifier(*keys: ec.EllipticCurvePublicKey, window: float = 60.0) -> RequestVerifier:
    table = {public_key_der(k): k for k in keys}
    return RequestVerifier(table.get, window)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_signed_request_verifies_on_each_curve(curve: ec.EllipticCurve) -> None:
    """A request signed with a P-256/P-384/P-521 key verifies with that key."""
    private, public = _pair(curve)
    headers = RequestSigner(private, public).headers("/m", b"body", NOW)
    assert _verifier(public).verify("/m", b"body", headers, NOW + 1)


def test_replay_tamper_method_and_window() -> None:
    """The same headers twice, another body, another method, or a timestamp outside the
    window are each refused with a reason."""
    private, public = _pair(ec.SECP256R1())
    signer, verifier = RequestSigner(private, public), _verifier(public, window=60)
    headers = signer.headers("/m", b"body", NOW)
    verifier.verify("/m", b"body", headers, NOW)
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify("/m", b"body", headers, NOW)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("/m", b"other", signer.headers("/m", b"body", NOW), NOW)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("/other", b"body", signer.headers("/m", b"body", NOW), NOW)
    with pytest.raises(AuthError, match=r"stale or future timestamp: \+61.0 s"):
        verifier.verify("/m", b"body", signer.headers("/m", b"body", NOW - 61), NOW)
    with pytest.raises(AuthError, match="stale or future"):
        verifier.verify("/m", b"body", signer.headers("/m", b"body", NOW + 61), NOW)


def test_unknown_key_missing_and_malformed_headers() -> None:
    """Unknown keys, missing headers and garbage headers are refused, naming the problem."""
    private, public = _pair(ec.SECP256R1())
    stranger = _pair(ec.SECP256R1())
    verifier = _verifier(public)
    with pytest.raises(AuthError, match="unknown node key"):
        verifier.verify("/m", b"", RequestSigner(*stranger).headers("/m", b"", NOW), NOW)
    headers = RequestSigner(private, public).headers("/m", b"", NOW)
    del headers[HEADER_SIGNATURE]
    with pytest.raises(AuthError, match=f"missing header {HEADER_SIGNATURE}"):
        verifier.verify("/m", b"", headers, NOW)
    headers = RequestSigner(private, public).headers("/m", b"", NOW)
    with pytest.raises(AuthError, match="malformed"):
        verifier.verify("/m", b"", {**headers, HEADER_TIMESTAMP: "soon"}, NOW)
    with pytest.raises(AuthError, match="malformed nonce"):
        verifier.verify("/m", b"", {**headers, HEADER_NONCE: "x" * 32}, NOW)


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        (HEADER_TIMESTAMP, "9" * 400, "at most 16 characters"),
        (HEADER_TIMESTAMP, "-1000", "milliseconds since the epoch"),
        (HEADER_TIMESTAMP, "\u0661\u0662", "milliseconds since the epoch"),
        (HEADER_SIGNATURE, "A" * 1_000_000, "at most 512 characters"),
    ],
    ids=["400-digit-timestamp", "negative", "non-ascii-digits", "megabyte-signature"],
)
def test_oversized_or_odd_headers_are_refused_before_decoding(
    header: str, value: str, expected: str
) -> None:
    """A 400-digit timestamp (which would overflow a float: a 500 before) or a megabyte
    of base64 is an AuthError naming the header, before anything is decoded."""
    private, public = _pair(ec.SECP256R1())
    headers = {**RequestSigner(private, public).headers("/m", b"", NOW), header: value}
    with pytest.raises(AuthError, match=expected):
        _verifier(public).verify("/m", b"", headers, NOW)


def test_nonces_are_forgotten_after_the_window() -> None:
    """Memory for nonces is bounded by the window: expired nonces are dropped."""
    private, public = _pair(ec.SECP256R1())
    signer, verifier = RequestSigner(private, public), _verifier(public, window=10)
    for i in range(50):
        verifier.verify("/m", b"", signer.headers("/m", b"", NOW + i * 0.1), NOW + i * 0.1)
    assert len(verifier._nonces) == 50
    verifier.verify("/m", b"", signer.headers("/m", b"", NOW + 100), NOW + 100)
    assert len(verifier._nonces) == 1


def test_signer_refuses_bad_key_pairs() -> None:
    """Non-EC keys and mismatched halves are configuration errors."""
    _, public = _pair(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="EllipticCurvePrivateKey"):
        RequestSigner(rsa_key, public)
    with pytest.raises(ConfigError, match="does not match"):
        RequestSigner(_pair(ec.SECP256R1())[0], public)
    with pytest.raises(ConfigError, match="curve"):
        RequestSigner(*_pair(ec.SECP256K1()))


def _pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ssh(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def test_key_file_of_pem_and_openssh_keys_reloads_when_changed(tmp_path: Path) -> None:
    """A file of PEM and OpenSSH keys is loaded; adding a key to it takes effect without a
    restart; a broken rewrite keeps the last good keys."""
    a, b, c = (_pair(ec.SECP256R1())[1], _pair(ec.SECP384R1())[1], _pair(ec.SECP256R1())[1])
    path = tmp_path / "keys"
    path.write_bytes(_pem(a) + b"# a comment\n" + _ssh(b) + b"\n")
    keys = AuthorizedKeys(str(path))
    assert len(keys) == 2
    assert keys.lookup(public_key_der(c)) is None
    path.write_bytes(path.read_bytes() + _ssh(c) + b"\n")
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 1_000_000))
    assert keys.lookup(public_key_der(c)) is not None
    path.write_bytes(b"not a key\n")
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 2_000_000))
    assert keys.lookup(public_key_der(a)) is not None


def test_parse_refuses_non_ec_keys() -> None:
    """An RSA key in the authorized keys is a configuration error naming the type."""
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = rsa_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="expected elliptic-curve public keys"):
        parse_public_keys(pem)
    with pytest.raises(ConfigError, match="line 1 is not a public key"):
        parse_public_keys(b"garbage line\n")
