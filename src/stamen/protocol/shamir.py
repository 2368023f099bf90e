"""Shamir secret sharing over the prime field GF(2**521 - 1) (sans-IO, pure).

A secret of up to 64 bytes is read as an integer below the prime, taken as the constant
term of a random polynomial of degree ``threshold - 1``; the share for the point ``x``
(an int in [1, 2**31)) is the polynomial's value there. Any ``threshold`` shares give the
secret back by Lagrange interpolation at 0; fewer reveal nothing about it (every secret
is equally likely given them).

Randomness is injected: ``rng(n)`` returns ``n`` random bytes (``os.urandom`` in use,
a seeded generator in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..errors import ConfigError, ProtocolError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "split"]

PRIME = 2**521 - 1
"""The field's prime (a Mersenne prime): secrets up to 64 bytes fit below it."""

SHARE_BYTES = 66
"""The length of one share's value (``PRIME`` needs 521 bits)."""

_MAX_SECRET = 64
_MAX_X = 2**31


def _element(rng: Callable[[int], bytes]) -> int:
    # 80 bytes reduced modulo a 521-bit prime: the bias is below 2**-118.
    return int.from_bytes(rng(80), "big") % PRIME


def split(
    secret: bytes, threshold: int, xs: Iterable[int], rng: Callable[[int], bytes]
) -> dict[int, bytes]:
    """Shares of ``secret``, one per point in ``xs``; any ``threshold`` of them rebuild it.

    Raises:
        ConfigError: a secret over 64 bytes, a threshold below 1 or above the number of
            points, or a point outside [1, 2**31) or repeated.
    """
    points = list(xs)
    if len(secret) > _MAX_SECRET:
        raise ConfigError(f"shamir: expected a secret of at most 64 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ConfigError(
            f"shamir: expected 1 <= threshold <= {len(points)} points, got {threshold}"
        )
    if len(set(points)) != len(points) or not all(1 <= x < _MAX_X for x in points):
        raise ConfigError(f"shamir: expected distinct points in [1, 2**31), got {points}")
    coefficients = [int.from_bytes(secret, "big")] + [_element(rng) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in points:
        value = 0
        for coefficient in reversed(coefficients):  # Horner
            value = (value * x + coefficient) % PRIME
        shares[x] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], length: int) -> bytes:
    """The secret (``length`` bytes) that ``shares`` (point -> share) were split from.

    Give at least the threshold's number of shares: fewer give a wrong value, which this
    function cannot tell (the caller checks the count).

    Raises:
        ProtocolError: no shares, a malformed share or point, or a value that does not
            fit ``length`` bytes (shares of different secrets).
    """
    if not shares:
        raise ProtocolError("shamir: no shares to combine")
    points: list[tuple[int, int]] = []
    for x, share in shares.items():
        if not 1 <= x < _MAX_X or len(share) != SHARE_BYTES:
            raise ProtocolError(f"shamir: malformed share at point {x}")
        value = int.from_bytes(share, "big")
        if value >= PRIME:
            raise ProtocolError(f"shamir: share at point {x} is not a field element")
        points.append((x, value))
    secret = 0
    for j, (xj, yj) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xj) % PRIME
        secret = (secret + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * length):
        raise ProtocolError("shamir: the shares do not rebuild a secret of the expected size")
    return secret.to_bytes(length, "big")
