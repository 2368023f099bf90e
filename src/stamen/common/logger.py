"""Flower's ``flwr.common.logger``: ``log`` and ``configure`` (see :mod:`stamen.logger`),
and the scoped progress handler :func:`shown_progress`."""

from __future__ import annotations

from ..logger import JsonFormatter, configure, log, shown_progress

__all__ = ["JsonFormatter", "configure", "log", "shown_progress"]
