"""Properties of the NumPy codec: bit-exact round-trips, DecodeError on bad bytes."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stamen.errors import DecodeError
from stamen.ndarrays import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numeric_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
arrays = hnp.arrays(dtype=numeric_dtypes, shape=shapes)


def _assert_identical(a: np.ndarray, b: np.ndarray) -> None:
    assert b.dtype == a.dtype
    assert b.shape == a.shape
    assert b.tobytes() == a.tobytes()  # bit-exact: NaN payloads, -0.0


@SETTINGS
@given(arrays)
def test_round_trip_is_bit_exact(array: np.ndarray) -> None:
    """Any numeric array comes back with the same dtype (byte order too), shape and bits."""
    _assert_identical(array, bytes_to_ndarray(ndarray_to_bytes(array)))


@SETTINGS
@given(arrays, st.sampled_from(["transpose", "fortran", "step"]))
def test_round_trip_of_non_c_contiguous_views(array: np.ndarray, layout: str) -> None:
    """Transposed, Fortran-ordered and strided views round-trip to equal contents."""
    if layout == "transpose":
        view = array.T
    elif layout == "fortran":
        view = np.asfortranarray(array)
    else:
        view = array[..., ::2] if array.ndim else array
    decoded = bytes_to_ndarray(ndarray_to_bytes(view))
    _assert_identical(np.ascontiguousarray(view), np.ascontiguousarray(decoded))


@SETTINGS
@given(st.lists(arrays, max_size=4))
def test_parameters_round_trip(values: list[np.ndarray]) -> None:
    """ndarrays_to_parameters then parameters_to_ndarrays gives the same arrays."""
    decoded = parameters_to_ndarrays(ndarrays_to_parameters(values))
    assert len(decoded) == len(values)
    for a, b in zip(values, decoded, strict=True):
        _assert_identical(a, b)


@SETTINGS
@given(arrays)
def test_bytes_are_readable_by_np_load(array: np.ndarray) -> None:
    """What we send is a standard .npy that np.load(allow_pickle=False) reads."""
    loaded = np.load(io.BytesIO(ndarray_to_bytes(array)), allow_pickle=False)
    _assert_identical(array, loaded)


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_decode_error(data: bytes) -> None:
    """Any bytes give an ndarray or DecodeError, never another exception."""
    try:
        result = bytes_to_ndarray(data)
    except DecodeError:
        return
    assert isinstance(result, np.ndarray)


@SETTINGS
@given(
    arrays,
    st.integers(min_value=0),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=64),
)
def test_corrupted_npy_decode_or_decode_error(
    array: np.ndarray, position: int, byte: int, cut: int
) -> None:
    """A valid .npy with one byte changed and its tail cut: ndarray or DecodeError."""
    data = ndarray_to_bytes(array)
    position %= len(data)
    data = data[:position] + bytes([byte]) + data[position + 1 :]
    data = data[: len(data) - min(cut, len(data))]
    try:
        result = bytes_to_ndarray(data)
    except DecodeError:
        return
    assert isinstance(result, np.ndarray)
    assert not result.dtype.hasobject
