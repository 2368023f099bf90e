"""Shamir sharing over GF(2**521 - 1): any threshold of the shares rebuild the secret."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.protocol.shamir import PRIME, SHARE_BYTES, combine, split


def _rng(seed: int):
    generator = random.Random(seed)
    return lambda n: generator.randbytes(n)


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    count=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**32),
)
def test_any_threshold_subset_rebuilds(secret: bytes, count: int, data: st.DataObject, seed: int):
    threshold = data.draw(st.integers(1, count))
    points = data.draw(
        st.lists(st.integers(1, 2**31 - 1), min_size=count, max_size=count, unique=True)
    )
    shares = split(secret, threshold, points, _rng(seed))
    assert set(shares) == set(points)
    assert all(len(s) == SHARE_BYTES for s in shares.values())
    chosen = data.draw(st.permutations(points))[: data.draw(st.integers(threshold, count))]
    assert combine({x: shares[x] for x in chosen}, 32) == secret


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), seed=st.integers(0, 2**32))
def test_fewer_than_threshold_shares_are_uniform_looking(secret: bytes, seed: int):
    # With threshold 3, two shares of two different secrets are equally likely: any pair
    # of values is consistent with every secret. We check the weaker, testable facts:
    # shares are field elements, and t-1 shares rebuild a different value.
    shares = split(secret, 3, [1, 2, 3, 4], _rng(seed))
    assert all(int.from_bytes(s, "big") < PRIME for s in shares.values())
    try:
        wrong = combine({1: shares[1], 2: shares[2]}, 32)
    except Exception:
        return
    assert wrong != secret
