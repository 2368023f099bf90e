"""Flower's ``flwr.common.logger``: ``log`` and ``configure`` (see :mod:`stamen.logger`)."""

from __future__ import annotations

from ..logger import configure, log

__all__ = ["configure", "log"]
