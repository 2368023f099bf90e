"""Array-likes where Flower's users return them: ``np.asarray`` semantics, as ``np.save``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from stamen.client import NumPyClient
from stamen.client.dispatch import handle
from stamen.context import Context, RecordSet
from stamen.errors import ConfigError
from stamen.messages import Code, FitIns, FitRes, GetParametersIns, GetParametersRes
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays


def npy(value: Any) -> bytes:
    """What Flower 1.12's ndarray_to_bytes makes of ``value``: ``np.save``."""
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


ARRAY_LIKES = {
    "float64 scalar of a 0-d array": np.array(4.0) * (5 / np.mean(np.array(4.0))),
    "int64 scalar from iterating an array": next(iter(np.array([1]))),
    "float32 scalar": np.float32(0.5),
    "list of lists of ints": [[1, 2], [3, 4]],
    "list of floats": [1.0, 2.5],
    "python int": 7,
    "python float": 0.25,
    "python bool": True,
}


@pytest.mark.parametrize("name", list(ARRAY_LIKES))
def test_an_array_like_is_encoded_as_np_save_encodes_it(name: str) -> None:
    """Each array-like gives the exact bytes np.save gives (so Flower), dtype included."""
    value = ARRAY_LIKES[name]
    parameters = ndarrays_to_parameters([value])
    assert parameters.tensors == [npy(value)]
    (decoded,) = parameters_to_ndarrays(parameters)
    expected = np.asarray(value)
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape


def test_a_bare_array_is_taken_as_its_rows() -> None:
    """As in Flower, a bare 2-d array from get_parameters is iterated: one tensor per row."""
    array = np.arange(6.0).reshape(2, 3)
    assert ndarrays_to_parameters(array).tensors == [npy(array[0]), npy(array[1])]


@pytest.mark.parametrize(
    "value", [[1, [2, 3]], None, [1, "a", None]], ids=["ragged", "None", "mixed objects"]
)
def test_what_needs_pickle_is_refused_with_a_clear_error(value: Any) -> None:
    """Ragged lists and anything that makes an object array are refused, naming why."""
    with pytest.raises(ConfigError, match="array"):
        ndarrays_to_parameters([value])


class ScalarClient(NumPyClient):
    """The classic toy client: a 0-d model scaled so that its mean is 5."""

    def get_parameters(self, config: Any) -> Any:
        return np.arange(6.0).reshape(2, 3)  # a bare array, as Flower's e2e test returns

    def fit(self, parameters: Any, config: Any) -> Any:
        return [param * (5 / np.mean(param)) for param in parameters], 1, {}


def test_a_numpy_client_returning_array_likes_answers_ok() -> None:
    """get_parameters returning a bare array and fit returning NumPy scalars both answer
    OK with the arrays np.asarray makes of them."""
    context = Context(node_id=0, node_config={}, state=RecordSet(), run_config={})
    client = ScalarClient().to_client()
    got = handle(lambda c: client, context, GetParametersIns(config={}))
    assert isinstance(got, GetParametersRes) and got.status.code == Code.OK
    assert [a.tolist() for a in parameters_to_ndarrays(got.parameters)] == [
        [0.0, 1.0, 2.0],
        [3.0, 4.0, 5.0],
    ]
    fitted = handle(lambda c: client, context, FitIns(ndarrays_to_parameters([np.array(2.0)]), {}))
    assert isinstance(fitted, FitRes) and fitted.status.code == Code.OK
    (model,) = parameters_to_ndarrays(fitted.parameters)
    assert model.shape == () and model.dtype == np.float64 and float(model) == 5.0
