"""Simulation: many virtual client nodes on one machine, or on a Ray cluster.

``stamen.simulation.start_simulation`` runs a Flower 1.12 ``start_simulation`` script
unchanged. The rounds run on the same Server, strategies and client manager as a real
deployment; only the client proxy differs: a :class:`VirtualClientProxy` calls the one
dispatch function of client nodes (:func:`stamen.client.dispatch.handle`) on a backend --
``"threads"`` (default), ``"sequential"`` (debugging) or ``"ray"`` (``stamen[ray]``).
Ray is imported only when the Ray backend starts.

``stamen.simulation.run_simulation`` runs Flower 1.12's ``ServerApp`` and ``ClientApp``
on the same machinery (see :mod:`stamen.simulation.apps`).
"""

from __future__ import annotations

from ._ray import RayBackend
from .app import BACKENDS, start_simulation
from .apps import run_simulation
from .backends import Backend, SequentialBackend, ThreadsBackend
from .proxy import VirtualClientProxy

__all__ = [
    "BACKENDS",
    "Backend",
    "RayBackend",
    "SequentialBackend",
    "ThreadsBackend",
    "VirtualClientProxy",
    "run_simulation",
    "start_simulation",
]
