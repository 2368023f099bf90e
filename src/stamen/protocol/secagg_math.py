"""The numbers of SecAgg+ (sans-IO, pure): quantization, masks in the modulus, dequantization.

A node's contribution is one flat ``uint32`` vector: entry 0 is its quantized weight,
the others its quantized, weighted parameters (every layer flattened, in order). All
arithmetic is in ``uint32``, which wraps modulo 2**32; since the modulus ``M`` is a power
of two dividing 2**32, reducing with ``& (M - 1)`` at the end gives the value modulo
``M``. Masks are AES-128-CTR keystreams (a PRG keyed by a 32-byte seed: key and initial
counter), so a masked vector is uniform over [0, M); they are drawn and folded in
cache-sized blocks (:func:`apply_masks`), never held whole.

Quantization, with clipping range ``c``, quantization range ``T`` and ``max_weight``
``W``: a node with ``n`` examples has weight ``w = min(n, W) / W`` in (0, 1], sent as
``q = round(w T)`` (so ``w' = q / T``); each parameter ``x`` becomes
``stochastic_round((clip(w' x, -c, c) + c) T / (2c))``, an integer in [0, T]. The server
reduces the sum of ``k`` such vectors, dequantizes (``S 2c / T - k c``) and divides by
``sum(q) / T``.

**The bound.** If every ``|x| <= c``, the aggregate differs from FedAvg weighted by
``min(n_i, W)`` by at most ``4 k c / (T sum_i w'_i)`` per parameter (stochastic rounding
is off by less than one step ``2c / T`` per node, and rounding each weight, by at most
``1 / T``, moves the weighted mean by at most ``2 k c / (T sum_i w'_i)``), plus the
rounding of the result to the model's dtype: :func:`error_bound`. With the defaults
(``c = 8``, ``T = 2**22``) and 10 nodes of full weight that is 7.6e-6. The sums never
wrap: a round needs ``k T < M`` (:func:`check_capacity`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from numpy.typing import NDArray

from ..errors import ConfigError

__all__ = [
    "Vector",
    "add_into",
    "apply_masks",
    "check_capacity",
    "dequantize",
    "error_bound",
    "prg_mask",
    "quantize",
    "reduce",
    "weight_factor",
]

Vector = NDArray[np.uint32]
"""A node's quantized (or masked) contribution, or a sum of them."""

_KEY = 16
"""AES-128: the first 16 bytes of a 32-byte seed key the PRG, the last 16 start its counter."""
_BLOCK = 1 << 15
"""Values per block: masks are drawn and folded a block at a time, in the CPU cache."""


def _zeros(size: int) -> memoryview:
    """``size`` zero bytes, shared (read only): the plaintext of the keystream."""
    global _ZEROS
    if len(_ZEROS) < size:
        _ZEROS = bytes(max(size, 2 * len(_ZEROS)))
    return memoryview(_ZEROS)[:size]


_ZEROS = b""
_BIG_ENDIAN = sys.byteorder == "big"  # the keystream is read little-endian everywhere


def _keystream(seed: bytes) -> CipherContext:
    if len(seed) != 2 * _KEY:
        raise ConfigError(f"secagg: expected a 32-byte mask seed, got {len(seed)} bytes")
    return Cipher(algorithms.AES(seed[:_KEY]), modes.CTR(seed[_KEY:])).encryptor()


def _draw(stream: CipherContext, buffer: Vector, size: int) -> Vector:
    """The next ``size`` uint32 of ``stream`` (read little-endian), written to the start
    of ``buffer``, which has room for 4 values more (``update_into`` needs a block)."""
    if size:
        stream.update_into(_zeros(4 * size), buffer.data.cast("B"))
    out = buffer[:size]
    if _BIG_ENDIAN:
        out.byteswap(inplace=True)
    return out


def prg_mask(seed: bytes, length: int, modulus: int) -> Vector:
    """``length`` pseudo-random values uniform in [0, modulus), from a 32-byte ``seed``
    (AES-128-CTR keystream: the same seed gives the same mask). The masks that
    :func:`apply_masks` adds are these, before the reduction modulo ``modulus``."""
    mask = _draw(_keystream(seed), np.empty(length + 4, dtype=np.uint32), length)
    return reduce(mask, modulus)


def apply_masks(total: Vector, add: Sequence[bytes], subtract: Sequence[bytes]) -> None:
    """``total += sum(prg(s) for s in add) - sum(prg(s) for s in subtract)`` modulo
    2**32, in place (reduce with :func:`reduce`), where ``prg(s)`` is
    ``prg_mask(s, total.size, 2**32)``.

    Work goes a block of ``total`` at a time, each mask drawn for that block only, so
    the masks never exist whole: memory is one block, whatever the number of seeds.
    """
    streams: list[tuple[CipherContext, np.ufunc]] = [(_keystream(s), np.add) for s in add]
    streams += [(_keystream(seed), np.subtract) for seed in subtract]
    block = np.empty(min(_BLOCK, total.size) + 4, dtype=np.uint32)
    raw, zeros = block.data.cast("B"), _zeros(4 * (block.size - 4))
    for start in range(0, total.size, _BLOCK):
        part = total[start : start + _BLOCK]
        plain, mask = zeros[: 4 * part.size], block[: part.size]
        for stream, fold in streams:  # the hot loop: _draw, inlined
            stream.update_into(plain, raw)
            if _BIG_ENDIAN:
                mask.byteswap(inplace=True)
            fold(part, mask, out=part)


def add_into(total: Vector, vector: Vector) -> None:
    """``total += vector`` modulo 2**32 (reduce with :func:`reduce`)."""
    np.add(total, vector, out=total, casting="unsafe")


def reduce(vector: Vector, modulus: int) -> Vector:
    """``vector`` modulo ``modulus`` (a power of two up to 2**32), in place."""
    if modulus != 2**32:
        np.bitwise_and(vector, np.uint32(modulus - 1), out=vector)
    return vector


def weight_factor(num_examples: int, max_weight: float, quantization_range: int) -> int:
    """``round(min(num_examples, max_weight) / max_weight * quantization_range)``, >= 1.

    Raises:
        ConfigError: ``num_examples <= 0``.
    """
    if num_examples <= 0:
        raise ConfigError(f"secagg: expected num_examples > 0, got {num_examples}")
    ratio = min(float(num_examples), max_weight) / max_weight
    return max(1, round(ratio * quantization_range))


def quantize(
    arrays: Sequence[NDArray[np.generic]],
    num_examples: int,
    *,
    clipping_range: float,
    quantization_range: int,
    max_weight: float,
    noise_seed: bytes,
    out: Vector | None = None,
) -> Vector:
    """A node's weighted, quantized contribution: ``[q, quantized parameters...]``,
    written to ``out`` if given (``1 +`` the number of parameters long).

    The stochastic rounding draws its noise from the PRG of the 32-byte ``noise_seed``
    (fast, and as good as the masks' randomness; it need not stay secret).

    Raises:
        ConfigError: ``out`` has the wrong length.
    """
    q = weight_factor(num_examples, max_weight, quantization_range)
    scale = q / quantization_range
    length = sum(int(np.size(a)) for a in arrays)
    if out is None:
        out = np.empty(1 + length, dtype=np.uint32)
    elif out.shape != (1 + length,):
        raise ConfigError(f"secagg: expected a vector of {1 + length} values, got {out.shape}")
    out[0] = q
    # (clip(w' x, -c, c) + c) T / 2c  ==  clip(x w' T / 2c + T / 2, 0, T)
    slope = scale * quantization_range / (2.0 * clipping_range)
    offset = quantization_range / 2.0
    position = 1
    block = _BLOCK  # work in blocks that stay in the CPU cache
    value = np.empty(block, dtype=np.float64)
    noise = np.empty(block, dtype=np.float64)
    bits = np.empty(block + 4, dtype=np.uint32)
    stream = _keystream(noise_seed)
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        for start in range(0, flat.size, block):
            part = flat[start : start + block]
            v, u = value[: part.size], noise[: part.size]
            np.multiply(part, slope, out=v)  # float64 whatever the layer's dtype
            # Stochastic rounding: floor(v + u), u ~ U[0, 1), rounds up with probability
            # frac(v). Clipping v + u to [0, T] gives what clipping v first would: the
            # cast to uint32 truncates, which is floor for the non-negative result.
            np.multiply(_draw(stream, bits, part.size), 2.0**-32, out=u)  # U[0, 1)
            u += offset
            v += u
            np.clip(v, 0.0, quantization_range, out=v)
            out[position + start : position + start + part.size] = v
        position += flat.size
    return out


def dequantize(
    total: Vector,
    count: int,
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[np.dtype[np.generic]],
    *,
    clipping_range: float,
    quantization_range: int,
) -> list[NDArray[np.generic]]:
    """The weighted mean from the reduced sum ``total`` of ``count`` contributions, as
    layers of ``shapes`` and ``dtypes``.

    Raises:
        ConfigError: the sum's length does not match the shapes, or its weight is 0.
    """
    length = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    if total.size != 1 + length:
        raise ConfigError(f"secagg: the sum has {total.size - 1} parameters, the model {length}")
    weight = int(total[0])
    if weight <= 0:
        raise ConfigError("secagg: the sum of the weights is 0")
    step = 2.0 * clipping_range / quantization_range
    factor = quantization_range / weight
    layers: list[NDArray[np.generic]] = []
    position = 1
    value = np.empty(min(_BLOCK, length), dtype=np.float64)  # in blocks, in the CPU cache
    for shape, dtype in zip(shapes, dtypes, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        layer = np.empty(size, dtype=dtype)
        for start in range(0, size, _BLOCK):
            part = total[position + start : position + min(start + _BLOCK, size)]
            v = value[: part.size]
            np.multiply(part, step, out=v)
            v -= count * clipping_range
            v *= factor
            layer[start : start + part.size] = v
        layers.append(layer.reshape(shape))
        position += size
    return layers


def error_bound(weights: Sequence[int], *, clipping_range: float, quantization_range: int) -> float:
    """The largest difference, per parameter, between the SecAgg+ aggregate of nodes with
    quantized weights ``weights`` (the ``q`` of each) and FedAvg weighted by
    ``min(num_examples, max_weight)``, when every parameter lies in
    [-clipping_range, clipping_range]: ``4 k c / (T sum(w'))`` with ``w' = q / T``."""
    total = sum(weights) / quantization_range
    return 4.0 * len(weights) * clipping_range / (quantization_range * total)


def check_capacity(count: int, quantization_range: int, modulus_range: int) -> None:
    """Raise ConfigError unless the sum of ``count`` contributions cannot wrap around."""
    if count * quantization_range >= modulus_range:
        raise ConfigError(
            f"secagg: {count} nodes x quantization_range {quantization_range} reach "
            f"modulus_range {modulus_range}: the sum would wrap around; raise "
            "modulus_range or lower quantization_range (at most "
            f"{(modulus_range - 1) // quantization_range} nodes fit)"
        )
