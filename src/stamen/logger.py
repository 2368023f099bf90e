"""``log`` and ``configure``: Flower 1.12's logging helpers, on the ``stamen`` logger.

``log(level, msg, *args)`` logs to the ``stamen`` logger (Flower code's
``from flwr.common.logger import log`` becomes ``from stamen.common.logger import log``,
or ``fl.common.log``). Importing Stamen adds no handler: what is shown, and where, is the
application's choice -- ``logging.basicConfig(...)``, or :func:`configure` to add a file
or an HTTP handler as Flower's ``configure`` does.

When the program configured no logging at all, ``start_server``, ``start_client`` and
``start_simulation`` show INFO progress on stderr for as long as they run
(:func:`shown_progress`), and remove that handler when they return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import logging.handlers
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "LOGGER_NAME",
    "JsonFormatter",
    "configure",
    "log",
    "logger",
    "logging_configured",
    "shown_progress",
]

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


_PROGRESS_FORMAT = "%(levelname)s %(name)s: %(message)s"


def logging_configured() -> bool:
    """Whether the program set up logging: a handler on the root or ``stamen`` logger, or
    a level on ``stamen`` (``logging.basicConfig``, :func:`configure`, the CLI's flags)."""
    stamen = logging.getLogger(LOGGER_NAME)
    return bool(logging.getLogger().handlers or stamen.handlers or stamen.level)


@contextlib.contextmanager
def shown_progress() -> Iterator[None]:
    """Show Stamen's INFO progress on stderr while the block runs, if the program
    configured no logging; otherwise leave logging as the program set it. Nothing stays
    installed after the block (the library keeps no handler).

    ``start_server``, ``start_client`` and ``start_simulation`` run inside it, so a script
    that sets up no logging still sees what its server, node or simulation does.
    """
    if logging_configured():
        yield
        return
    stamen = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_PROGRESS_FORMAT))
    stamen.addHandler(handler)
    stamen.setLevel(logging.INFO)
    try:
        yield
    finally:
        stamen.removeHandler(handler)
        stamen.setLevel(logging.NOTSET)


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line.

    Keys: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``; a record logged
    for a run event (``extra={"event": ...}``, as :class:`stamen.server.progress.ProgressLog`
    does) also has ``event`` (its type) and its fields; ``exception`` holds a traceback.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        data: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None and dataclasses.is_dataclass(event) and not isinstance(event, type):
            data["event"] = type(event).__name__
            data.update(dataclasses.asdict(event))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=_json_default, ensure_ascii=False)


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)
