"""The numbers of SecAgg+ (sans-IO, pure): quantization, masks in the modulus, dequantization.

A node's contribution is one flat ``uint32`` vector: entry 0 is its quantized weight,
the others its quantized, weighted parameters (every layer flattened, in order). All
arithmetic is in ``uint32``, which wraps modulo 2**32; since the modulus ``M`` is a power
of two dividing 2**32, reducing with ``& (M - 1)`` at the end gives the value modulo
``M``. Masks are AES-128-CTR keystreams (a PRG keyed by a 32-byte seed: key and nonce,
:func:`_keystream`), so a masked vector is uniform over [0, M); they are drawn and folded
in cache-sized blocks, never held whole: by the node as it quantizes each block
(:func:`quantize`), by the server over its sum (:func:`apply_masks`).

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
from collections.abc import Iterator, Sequence

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
"""AES-128: the first 16 bytes of a 32-byte seed key the PRG."""
_NONCE = 12
"""The next 12 bytes are the nonce of its counter blocks (the last 4 are not used)."""
_MAX_VALUES = 4 * (2**32 - 2)
"""Values one keystream gives: 4 a block, the 32-bit counter running from 2 up."""
_BLOCK = 1 << 17
"""Values per block: masks are drawn and folded a block at a time, in the CPU cache
(512 KiB of ``uint32``; the quantizer's float64 scratch is 2 MiB). Smaller blocks cost
more than they save in cache: NumPy and OpenSSL release the GIL on every call, and two
threads masking at once lose more to handing it over (measured at 2**15: 10.9 ms wall a
node for two threads, against 6.5 ms at 2**17)."""


def _zeros(size: int) -> memoryview:
    """``size`` zero bytes, shared (read only): the plaintext of the keystream."""
    global _ZEROS
    if len(_ZEROS) < size:
        _ZEROS = bytes(max(size, 2 * len(_ZEROS)))
    return memoryview(_ZEROS)[:size]


_ZEROS = b""
_BIG_ENDIAN = sys.byteorder == "big"  # the keystream is read little-endian everywhere


def _keystream(seed: bytes) -> CipherContext:
    """The PRG of a 32-byte ``seed``: AES-128 in counter mode, keyed by ``seed[:16]``,
    on the counter blocks ``seed[16:28] || c`` for ``c = 2, 3, ...`` (32 bits, big-endian).

    That is exactly the keystream of AES-GCM's encryption with the 12-byte nonce
    ``seed[16:28]`` (NIST SP 800-38D: GCTR from ``inc32(J0)``), and it is drawn through
    OpenSSL's GCM encryptor, whose VAES code runs ~1.7x faster than its CTR mode on x86
    CPUs with VAES (the same speed elsewhere); the authentication tag is never computed.
    """
    if len(seed) != 2 * _KEY:
        raise ConfigError(f"secagg: expected a 32-byte mask seed, got {len(seed)} bytes")
    return Cipher(algorithms.AES(seed[:_KEY]), modes.GCM(seed[_KEY : _KEY + _NONCE])).encryptor()


def _check_length(length: int) -> None:
    if length > _MAX_VALUES:
        raise ConfigError(
            f"secagg: a vector of {length} values is longer than one mask keystream "
            f"({_MAX_VALUES} values)"
        )


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
    (the same seed gives the same mask). The masks that :func:`apply_masks` adds are
    these, before the reduction modulo ``modulus``."""
    _check_length(length)
    mask = _draw(_keystream(seed), np.empty(length + 4, dtype=np.uint32), length)
    return reduce(mask, modulus)


class _Masks:
    """The masks of ``add`` and ``subtract`` seeds, folded into consecutive parts of a
    vector (each at most one block long) in order: each mask is drawn for that part only,
    so the masks never exist whole."""

    def __init__(self, add: Sequence[bytes], subtract: Sequence[bytes], length: int) -> None:
        _check_length(length)
        self._streams: list[tuple[CipherContext, np.ufunc]] = [
            (_keystream(seed), np.add) for seed in add
        ]
        self._streams += [(_keystream(seed), np.subtract) for seed in subtract]
        self._block = np.empty(min(_BLOCK, length) + 4, dtype=np.uint32)
        self._raw = self._block.data.cast("B")

    def fold(self, part: Vector) -> None:
        """``part += sum(add masks) - sum(subtract masks)`` over the next ``part.size``
        values of each, modulo 2**32, in place."""
        plain, mask, raw = _zeros(4 * part.size), self._block[: part.size], self._raw
        for stream, fold in self._streams:  # the hot loop: _draw, inlined
            stream.update_into(plain, raw)
            if _BIG_ENDIAN:
                mask.byteswap(inplace=True)
            fold(part, mask, out=part)


def apply_masks(total: Vector, add: Sequence[bytes], subtract: Sequence[bytes]) -> None:
    """``total += sum(prg(s) for s in add) - sum(prg(s) for s in subtract)`` modulo
    2**32, in place (reduce with :func:`reduce`), where ``prg(s)`` is
    ``prg_mask(s, total.size, 2**32)``.

    Work goes a block of ``total`` at a time, each mask drawn for that block only, so
    the masks never exist whole: memory is one block, whatever the number of seeds.
    """
    masks = _Masks(add, subtract, total.size)
    for start in range(0, total.size, _BLOCK):
        masks.fold(total[start : start + _BLOCK])


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


def _pieces(arrays: Sequence[NDArray[np.generic]]) -> Iterator[tuple[int, NDArray[np.generic]]]:
    """``(position, piece)``: the layers, flattened, cut where they cross a block of the
    vector they fill from position 1 (a piece lies within one block)."""
    position = 1
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        start = 0
        while start < flat.size:
            piece = flat[start : start + _BLOCK - position % _BLOCK]
            yield position, piece
            position += piece.size
            start += piece.size


class _Quantizer:
    """Stochastic rounding of ``x`` to ``floor(x slope + offset + u)`` clipped to [0, T],
    ``u ~ U[0, 1)`` from the PRG of ``noise_seed``; a piece (at most a block) at a time,
    in scratch blocks that stay in the CPU cache."""

    def __init__(self, slope: float, offset: float, quantization_range: int, noise_seed: bytes):
        self._slope, self._range = slope, float(quantization_range)
        # The noise is read as int32 (cast to float64 faster than uint32): s / 2**32 lies
        # in [-1/2, 1/2), so s / 2**32 + 1/2 is u, in [0, 1), as uniform as the bits.
        self._offset = offset + 0.5
        self._noise_stream = _keystream(noise_seed)
        self._value = np.empty(_BLOCK, dtype=np.float64)
        self._noise = np.empty(_BLOCK, dtype=np.float64)
        self._bits = np.empty(_BLOCK + 4, dtype=np.uint32)
        # The result fits int32 below 2**31 (a faster cast than to uint32).
        self._signed = quantization_range < 2**31

    def __call__(self, piece: NDArray[np.generic], dst: Vector) -> None:
        v, u = self._value[: piece.size], self._noise[: piece.size]
        np.multiply(piece, self._slope, out=v)  # float64 whatever the layer's dtype
        # Stochastic rounding: floor(v + u), u ~ U[0, 1), rounds up with probability
        # frac(v). Clipping v + u to [0, T] gives what clipping v first would: the cast
        # truncates, which is floor for the non-negative result.
        bits = _draw(self._noise_stream, self._bits, piece.size).view(np.int32)
        np.multiply(bits, 2.0**-32, out=u)
        u += self._offset
        v += u
        np.clip(v, 0.0, self._range, out=v)
        np.copyto(dst.view(np.int32) if self._signed else dst, v, casting="unsafe")


def quantize(
    arrays: Sequence[NDArray[np.generic]],
    num_examples: int,
    *,
    clipping_range: float,
    quantization_range: int,
    max_weight: float,
    noise_seed: bytes,
    out: Vector | None = None,
    add: Sequence[bytes] = (),
    subtract: Sequence[bytes] = (),
) -> Vector:
    """A node's weighted, quantized contribution: ``[q, quantized parameters...]``,
    written to ``out`` if given (``1 +`` the number of parameters long); with the masks of
    ``add`` and ``subtract`` seeds folded in (what :func:`apply_masks` would do after,
    but in the same pass: each block is quantized and masked while in the CPU cache).

    The stochastic rounding draws its noise from the PRG of the 32-byte ``noise_seed``
    (fast, and as good as the masks' randomness; it need not stay secret).

    Raises:
        ConfigError: ``out`` has the wrong length.
    """
    q = weight_factor(num_examples, max_weight, quantization_range)
    length = 1 + sum(int(np.size(a)) for a in arrays)
    if out is None:
        out = np.empty(length, dtype=np.uint32)
    elif out.shape != (length,):
        raise ConfigError(f"secagg: expected a vector of {length} values, got {out.shape}")
    out[0] = q
    # (clip(w' x, -c, c) + c) T / 2c  ==  clip(x w' T / 2c + T / 2, 0, T), w' = q / T
    slope = q / (2.0 * clipping_range)
    quantizer = _Quantizer(slope, quantization_range / 2.0, quantization_range, noise_seed)
    masks = _Masks(add, subtract, length)
    for position, piece in _pieces(arrays):
        end = position + piece.size
        quantizer(piece, out[position:end])
        if end % _BLOCK == 0 or end == length:  # a block is whole: mask it
            masks.fold(out[(end - 1) // _BLOCK * _BLOCK : end])
    if length == 1:
        masks.fold(out)
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
