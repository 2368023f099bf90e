"""Deterministic clients shared by the integration tests."""

from __future__ import annotations

import numpy as np

import stamen as fl
from stamen.typing import NDArrays


class AddClient(fl.client.NumPyClient):
    """Deterministic client: fit adds ``k`` to every parameter; reports ``num_examples``."""

    def __init__(self, k: float, num_examples: int) -> None:
        self.k = k
        self.num_examples = num_examples

    def get_parameters(self, config: fl.common.Config) -> NDArrays:
        return [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]

    def fit(
        self, parameters: NDArrays, config: fl.common.Config
    ) -> tuple[NDArrays, int, dict[str, fl.common.Scalar]]:
        return [p + self.k for p in parameters], self.num_examples, {"k": self.k}

    def evaluate(
        self, parameters: NDArrays, config: fl.common.Config
    ) -> tuple[float, int, dict[str, fl.common.Scalar]]:
        return float(parameters[1].sum()), self.num_examples, {"k": self.k}
