"""Ready-made metrics aggregation functions for ``fit_metrics_aggregation_fn`` and
``evaluate_metrics_aggregation_fn``."""

from __future__ import annotations

from ...typing import Metrics

__all__ = ["weighted_average"]


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    """Average every numeric metric over the clients, weighted by their examples.

    For each key, ``sum_k n_k m_k / sum_k n_k`` over the clients ``k`` that report a number
    (``int`` or ``float``; ``bool``, ``str`` and ``bytes`` values are left out) under that
    key. A key whose clients hold 0 examples in total is left out. Keys keep the order in
    which they first appear.

    Example::

        strategy = FedAvg(evaluate_metrics_aggregation_fn=weighted_average)
        # clients report (10, {"accuracy": 0.5}) and (30, {"accuracy": 0.9})
        # -> {"accuracy": 0.8}

    Args:
        metrics: ``[(num_examples, metrics)]``, one pair per client, as the hooks receive.

    Returns:
        The averaged metrics, each a float.
    """
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, client_metrics in metrics:
        for key, value in client_metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            sums[key] = sums.get(key, 0.0) + num_examples * value
            weights[key] = weights.get(key, 0) + num_examples
    return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
