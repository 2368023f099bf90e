"""``log`` and ``configure``: Flower 1.12's logging helpers, on the ``stamen`` logger.

``log(level, msg, *args)`` logs to the ``stamen`` logger (Flower code's
``from flwr.common.logger import log`` becomes ``from stamen.common.logger import log``,
or ``fl.common.log``). Importing Stamen adds no handler: what is shown, and where, is the
application's choice -- ``logging.basicConfig(...)``, or :func:`configure` to add a file
or an HTTP handler as Flower's ``configure`` does.
"""

from __future__ import annotations

import logging
import logging.handlers
from typing import Any

__all__ = ["LOGGER_NAME", "configure", "log", "logger"]

LOGGER_NAME = "stamen"
"""The name of Stamen's logger."""

logger = logging.getLogger(LOGGER_NAME)
"""Stamen's logger (every module of Stamen logs to a child of it)."""


def log(level: int, msg: object, *args: object, **kwargs: Any) -> None:
    """Log ``msg % args`` at ``level`` on the ``stamen`` logger (Flower's ``log``).

    Args:
        level: A :mod:`logging` level (``logging.INFO``, ...).
        msg: The message, with ``%`` placeholders for ``args``.
        args: Values of the placeholders.
        kwargs: :meth:`logging.Logger.log` keywords (``exc_info``, ``stacklevel``, ...).
    """
    kwargs.setdefault("stacklevel", 2)  # report the caller's file and line, not this one
    logger.log(level, msg, *args, **kwargs)


def configure(identifier: str, filename: str | None = None, host: str | None = None) -> None:
    """Also send the ``stamen`` logger's records to a file and/or an HTTP server.

    Flower 1.12's signature. Records are formatted as
    ``identifier | LEVEL time | file:line | message``.

    Args:
        identifier: Names this process in every line (e.g. ``"client-3"``).
        filename: Append the log to this file.
        host: ``host:port`` of an HTTP server that receives each record by ``POST /log``.
    """
    formatter = logging.Formatter(
        f"{identifier} | %(levelname)s %(asctime)s | %(filename)s:%(lineno)d | %(message)s"
    )
    if filename is not None:
        file_handler = logging.FileHandler(filename)
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    if host is not None:
        http_handler = logging.handlers.HTTPHandler(host, "/log", method="POST")
        http_handler.setLevel(logging.DEBUG)
        logger.addHandler(http_handler)
