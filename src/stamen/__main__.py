"""``python -m stamen``: the ``stamen`` command (see :mod:`stamen.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
