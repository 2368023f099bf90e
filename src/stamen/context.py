"""The context a client node passes to ``client_fn``: who the node is and its state."""

from __future__ import annotations

from dataclasses import dataclass

# The record types live in stamen.records; they stay importable from here.
from .records import ConfigsRecord as ConfigsRecord
from .records import MetricsRecord as MetricsRecord
from .records import ParametersRecord as ParametersRecord
from .records import RecordSet as RecordSet
from .typing import UserConfig

__all__ = ["Context"]


@dataclass
class Context:
    """What ``client_fn`` learns about the node it builds a client for.

    Attributes:
        node_id: The id of this node. ``-1`` on grpc-bidi (as in Flower): the stream has
            no node identity; the id the server assigns on grpc-rere and rest.
        node_config: Configuration of this node (``partition-id`` etc. in simulation).
        state: Persists across all messages of one run in this process: a
            :class:`~stamen.records.RecordSet` of typed records, as in Flower 1.12.
        run_config: Configuration of the run.
    """

    node_id: int
    node_config: UserConfig
    state: RecordSet
    run_config: UserConfig
