"""FedMedian: the coordinate-wise median of the client models."""

from __future__ import annotations

from ...typing import NDArrays
from .aggregate import aggregate_median
from .fedavg import FedAvg, fit_results_of
from .validate import CheckedFitResults

__all__ = ["FedMedian"]


class FedMedian(FedAvg):
    """Coordinate-wise median: each parameter is the median of the clients' values.

    ``w_{t+1}[j] = median_k w_k[j]`` (for an even number of clients, the mean of the two
    middle values). The numbers of examples are ignored. Robust to fewer than half of the
    clients sending arbitrary values.

    Paper: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (arXiv:1803.01498).

    Memory: the median needs all the results' models at once (one decoded copy each).

    Keywords and defaults are FedAvg's (Flower 1.12 gives FedMedian no keyword of its own).
    """

    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays:
        """The coordinate-wise median of the valid results."""
        return aggregate_median(fit_results_of(checked))
