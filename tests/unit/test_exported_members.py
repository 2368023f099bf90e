"""Each public module's ``__all__`` is sorted and equals its public names."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import stamen


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    ]


def ruff_sorted(names: list[str]) -> list[str]:
    """The order ruff's RUF022 enforces on ``__all__`` (the linter this repo runs).

    "isort-style": SCREAMING_SNAKE_CASE first, then CamelCase, then the rest, each group
    in natural order. Where it differs from plain ``sorted()`` (e.g. ``ERRORS`` before
    ``CreateNodeRequest``) a plain-sorted ``__all__`` would fail lint, so this is "sorted".
    """

    def key(name: str) -> tuple[int, list[tuple[int, int | str]]]:
        if any(c.isalpha() for c in name) and all(
            c.isupper() or c.isdigit() or c == "_" for c in name
        ):
            group = 0
        elif name[:1].isupper():
            group = 1
        else:
            group = 2
        return group, _natural(name)

    return sorted(names, key=key)


# module -> True for a facade (package __init__ or re-export module): what it imports from
# Stamen is public. For the others, only what the module itself defines is public.
MODULES = {
    "stamen": True,
    "stamen.client": True,
    "stamen.server": True,
    "stamen.server.strategy": True,
    "stamen.common": True,
    "stamen.wire": True,
    "stamen.simulation": True,
    "stamen.protocol": True,
    "stamen.testing": True,
    "stamen.transport": True,
    "stamen.errors": False,
    "stamen.messages": False,
    "stamen.ndarrays": False,
    "stamen.context": False,
    "stamen.typing": False,
    "stamen.records": False,
    "stamen.message": False,
    "stamen.recordset_compat": False,
    "stamen.logger": False,
    "stamen.app_loader": False,
    "stamen.common.logger": True,
    "stamen.common.recordset_compat": True,
    "stamen.common.typing": True,
    "stamen.client.client_app": False,
    "stamen.client.mod": False,
    "stamen.server.server_app": False,
    "stamen.simulation.apps": False,
}


def _bound_names(module: ModuleType, facade: bool) -> set[str]:
    """Names bound at the top level of the module's source that count as its own."""
    source = Path(inspect.getfile(module)).read_text()
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif (
            facade
            and isinstance(node, ast.ImportFrom)
            and (node.level > 0 or (node.module or "").split(".")[0] == "stamen")
        ):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _public_names(module: ModuleType, facade: bool) -> set[str]:
    """The public API by the rule: own (or, for facades, re-exported) non-underscore names.

    Excluded: modules (submodules, ``import numpy as np``) and ``annotations`` (the
    ``from __future__`` feature).
    """
    candidates = _bound_names(module, facade)
    # Classes and functions defined here however they were bound (e.g. by a decorator).
    candidates.update(
        name
        for name, value in vars(module).items()
        if getattr(value, "__module__", None) == module.__name__
        and (inspect.isclass(value) or inspect.isfunction(value))
    )
    return {
        name
        for name in candidates
        if not name.startswith("_")
        and name != "annotations"
        and not isinstance(getattr(module, name, None), ModuleType)
    }


@pytest.mark.parametrize(("name", "facade"), list(MODULES.items()))
def test_all_is_sorted_and_unique(name: str, facade: bool) -> None:
    """``__all__`` is sorted (ruff's RUF022 order) and has no duplicates."""
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == ruff_sorted(exported)
    assert len(exported) == len(set(exported))


@pytest.mark.parametrize(("name", "facade"), list(MODULES.items()))
def test_every_name_in_all_exists(name: str, facade: bool) -> None:
    """Every name in ``__all__`` is an attribute of the module."""
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


@pytest.mark.parametrize(("name", "facade"), list(MODULES.items()))
def test_every_public_name_is_in_all(name: str, facade: bool) -> None:
    """Every public name the module defines (or a facade re-exports) is listed in ``__all__``."""
    module = importlib.import_module(name)
    unlisted = sorted(_public_names(module, facade) - set(module.__all__))
    assert unlisted == [], f"{name}: public but not in __all__: {unlisted}"


@pytest.mark.parametrize(("name", "facade"), list(MODULES.items()))
def test_all_lists_only_public_names(name: str, facade: bool) -> None:
    """``__all__`` holds only the module's public names, its submodules and dunders it sets."""
    module = importlib.import_module(name)
    allowed = _public_names(module, facade)
    extra = []
    for exported in module.__all__:
        value = getattr(module, exported, None)
        if exported in allowed:
            continue
        if isinstance(value, ModuleType) and value.__name__.startswith(name + "."):
            continue  # a subpackage exposed by a facade, e.g. stamen.client
        if exported.startswith("__") and exported in _bound_names(module, facade):
            continue  # e.g. stamen.__version__
        lazy = "__getattr__" in vars(module)
        if lazy and str(getattr(value, "__module__", "")).startswith(name + "."):
            continue  # resolved on first use by the package's __getattr__ (PEP 562)
        extra.append(exported)
    assert extra == [], f"{name}: __all__ lists non-public names {extra}"


def _all_modules() -> list[str]:
    names = ["stamen"]
    for info in pkgutil.walk_packages(stamen.__path__, prefix="stamen.", onerror=lambda _: None):
        if "._pb" not in info.name and not info.name.endswith(".__main__"):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _all_modules())
def test_every_module_has_a_sorted_all_of_existing_names(name: str) -> None:
    """Every Stamen module but ``__main__`` and _pb has a sorted ``__all__`` of existing names."""
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    exported = list(module.__all__)
    assert exported == ruff_sorted(exported)
    assert [n for n in exported if not hasattr(module, n)] == []


def test_the_rule_catches_unlisted_and_spurious_names(tmp_path: Path) -> None:
    """Self-check: the rule sees an unlisted function, constant and alias, not imports."""
    path = tmp_path / "sample_module.py"
    path.write_text(
        "from __future__ import annotations\n"
        "import os\n"
        "from collections.abc import Mapping\n"
        "__all__ = ['listed']\n"
        "def listed(): ...\n"
        "def unlisted(): ...\n"
        "CONSTANT = 1\n"
        "Alias = int | str\n"
        "_private = 2\n"
    )
    spec = importlib.util.spec_from_file_location("sample_module", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert _public_names(module, facade=False) == {"listed", "unlisted", "CONSTANT", "Alias"}


def test_ruff_sorted_reproduces_ruffs_order() -> None:
    """Self-check: ruff_sorted gives the order ``ruff check --select RUF022 --fix`` writes."""
    names = ["CreateNodeRequest", "ERRORS", "ErrorKind", "PROTOCOL_VERSION", "a2", "a10", "_x"]
    names += ["__version__", "b"]
    assert ruff_sorted(names) == [
        "ERRORS",
        "PROTOCOL_VERSION",
        "CreateNodeRequest",
        "ErrorKind",
        "__version__",
        "_x",
        "a2",
        "a10",
        "b",
    ]
