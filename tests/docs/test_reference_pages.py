"""The API reference covers every public package and each public submodule they export.

mkdocstrings renders every name in a module's ``__all__``; this test checks that each
public package has its ``::: module`` directive, and that submodules exported by name
(``stamen.server.strategy``, ``stamen.testing.conformance``, ...) have one too.
``make docs`` (``mkdocs build --strict``) then fails on any reference that does not
resolve.
"""

from __future__ import annotations

import importlib
import re
import types

from .programs import ROOT

PUBLIC = [
    "stamen.client",
    "stamen.server",
    "stamen.server.strategy",
    "stamen.simulation",
    "stamen.common",
    "stamen.errors",
    "stamen.testing",
    "stamen.transport",
]


def _documented() -> set[str]:
    found: set[str] = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        found.update(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE))
    return found


def test_every_public_package_has_a_reference() -> None:
    documented = _documented()
    assert [name for name in PUBLIC if name not in documented] == []


def test_exported_submodules_have_a_reference() -> None:
    documented = _documented()
    missing = []
    for package in PUBLIC:
        module = importlib.import_module(package)
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, types.ModuleType) and value.__name__ not in documented:
                missing.append(value.__name__)
    assert missing == []
