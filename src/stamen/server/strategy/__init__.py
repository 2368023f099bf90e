"""Strategies: how a server runs rounds. Flower's class names, keywords and defaults."""

from __future__ import annotations

from .aggregate import aggregate, weighted_loss_avg
from .fedavg import FedAvg
from .strategy import Strategy

__all__ = ["FedAvg", "Strategy", "aggregate", "weighted_loss_avg"]
