"""MkDocs hook: Stamen's docstrings use reStructuredText roles (``:class:`X```); the API
reference shows them as code, without the role's name, and drops the ``::`` that
introduces a literal block."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")
_LITERAL = re.compile(r"::(</p>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Strip the role names and the literal-block markers from a page's HTML."""
    return _LITERAL.sub(r":\1", _ROLE.sub("", html))
