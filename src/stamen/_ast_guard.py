"""One ``ast.parse`` at a time, on the CPython versions where concurrent parses corrupt each
other (python/cpython#106905).

CPython 3.11.0-3.11.7 and 3.12.0-3.12.1 (and 3.10, which never received the fix) keep the
recursion depth of the AST constructor in state shared by the whole interpreter. When a
garbage collection inside one thread's parse runs Python code -- a ``gc.callbacks`` entry,
such as the one Hypothesis installs, or a finalizer -- the GIL can pass to another thread
that parses too, and one of the parses fails with ``SystemError: AST constructor recursion
depth mismatch`` (or a spurious ``RecursionError``). Fixed in 3.11.8 and 3.12.2.

Parsing happens where one would not expect it: NumPy reads every ``.npy`` header with
``ast.literal_eval``, so every ``parameters_to_ndarrays`` of a virtual client's fit or
evaluate, and every ``np.load`` in client code, parses. On the threads backend several
clients do so at once, and one call in a few thousand failed with a ``CLIENT_ERROR``
reply. :func:`serialize_ast_parse` makes ``ast.parse`` (which ``ast.literal_eval`` calls)
take :data:`PARSE_LOCK` on those versions; elsewhere it does nothing. ``stamen.ndarrays``
reads plain headers without ``ast`` and runs NumPy's parser for the rest under the same
lock, on every version.
"""

from __future__ import annotations

import ast
import functools
import platform
import sys
import threading
from typing import Any

__all__ = ["AST_PARSE_IS_THREAD_UNSAFE", "PARSE_LOCK", "serialize_ast_parse"]


def _thread_unsafe(implementation: str, version: tuple[int, int, int]) -> bool:
    """Whether this interpreter shares the AST constructor's recursion depth across threads."""
    if implementation != "CPython":
        return False
    return version < (3, 11, 8) or (3, 12) <= version < (3, 12, 2)


AST_PARSE_IS_THREAD_UNSAFE = _thread_unsafe(
    platform.python_implementation(),
    (sys.version_info.major, sys.version_info.minor, sys.version_info.micro),
)
"""True on the interpreters where two threads must not run ``ast.parse`` at once."""

_MARK = "_stamen_serialized"
_install = threading.Lock()
PARSE_LOCK = threading.RLock()
"""Held by every serialized parse (re-entrant: a finalizer run by a parse's GC may parse)."""


def serialize_ast_parse() -> bool:
    """On an affected interpreter, make ``ast.parse`` hold a process-wide lock (once).

    Returns:
        Whether ``ast.parse`` is serialized now (False where it needs not be).
    """
    if not AST_PARSE_IS_THREAD_UNSAFE:
        return False
    with _install:
        original = ast.parse
        if getattr(original, _MARK, False):
            return True

        @functools.wraps(original)
        def parse(*args: Any, **kwargs: Any) -> Any:
            with PARSE_LOCK:
                return original(*args, **kwargs)

        setattr(parse, _MARK, True)
        setattr(ast, "parse", parse)  # noqa: B010  (mypy: ast.parse is an overloaded def)
    return True
