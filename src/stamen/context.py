"""The context a client node passes to ``client_fn``: who the node is and its state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .typing import Scalar, UserConfig

__all__ = ["ConfigsRecord", "Context", "MetricsRecord", "ParametersRecord", "RecordSet"]


class MetricsRecord(dict[str, Scalar]):
    """Named metrics kept in :attr:`RecordSet.metrics_records`."""


class ConfigsRecord(dict[str, Scalar]):
    """Named configuration values kept in :attr:`RecordSet.configs_records`."""


class ParametersRecord(dict[str, Any]):
    """Named arrays kept in :attr:`RecordSet.parameters_records`."""


@dataclass
class RecordSet:
    """State a client keeps between the messages of one run (per node, per run)."""

    parameters_records: dict[str, ParametersRecord] = field(default_factory=dict)
    metrics_records: dict[str, MetricsRecord] = field(default_factory=dict)
    configs_records: dict[str, ConfigsRecord] = field(default_factory=dict)


@dataclass
class Context:
    """What ``client_fn`` learns about the node it builds a client for.

    Attributes:
        node_id: The id of this node. ``-1`` on grpc-bidi (as in Flower): the stream has
            no node identity; the id the server assigns on grpc-rere and rest.
        node_config: Configuration of this node (``partition-id`` etc. in simulation).
        state: Persists across all messages of one run in this process.
        run_config: Configuration of the run.
    """

    node_id: int
    node_config: UserConfig
    state: RecordSet
    run_config: UserConfig
