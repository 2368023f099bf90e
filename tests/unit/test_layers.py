"""Stamen's layers point one way: every import of ``src/stamen`` goes down the rank table.

The modules are read with ``ast`` (not imported), so every import counts: at the top,
inside functions, and under ``if TYPE_CHECKING:``. Each module belongs to the unit named
by its first component under ``stamen`` (``stamen.server.fleet.rest`` is ``server``), and
:data:`RANKS` gives each unit its layer::

    apps (cli, demo, testing, the ``stamen`` facade)
      -> simulation -> server, client -> transport -> wire, net
      -> protocol, ndarrays, privacy -> messages -> errors
    (bottom helpers: typing, clock, context, memory, ... used by many)

A unit imports only units of a lower rank: never one of a higher rank, nor another unit
of its own rank (client and server do not import each other); no units import each other
in a cycle; ``stamen.protocol`` (sans-IO) imports no I/O library; no module reaches into
another package's private (``_underscore``) module; and every public exception class is
defined in ``errors.py``. A failure lists each offending import with its file and line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

import stamen
import stamen.errors

ROOT = Path(stamen.__file__).parent

RANKS: dict[str, int] = {
    # bottom: the exception tree, then helpers with no Stamen dependency but errors
    "errors": 0,
    "typing": 1,
    "clock": 1,
    "memory": 1,
    "logger": 1,
    "_ast_guard": 1,
    "app_loader": 2,
    "_dtypes": 2,
    "messages": 3,
    # pure computation on messages and arrays, sans-IO protocol state machines
    "ndarrays": 4,
    "protocol": 4,
    "privacy": 4,
    # bytes on the wire; networking helpers shared by both sides (address, TLS, loop)
    "wire": 5,
    "net": 5,
    "records": 5,  # Flower's RecordSet types: arrays travel as .npy (ndarrays)
    "context": 6,  # a node's Context holds a RecordSet
    "message": 6,
    "recordset_compat": 6,
    "transport": 6,
    # the two sides: neither imports the other
    "client": 7,
    "server": 7,
    "simulation": 8,  # runs server-side proxies over client-side dispatch
    # applications and facades
    "common": 9,
    "testing": 9,
    "demo": 9,
    "": 10,  # the ``stamen`` package itself (its facade ``__init__``)
    "cli": 11,  # reads ``stamen.__version__``
    "__main__": 12,
}

IO_LIBRARIES = {
    "asyncio",
    "grpc",
    "h11",
    "httpcore",
    "httpx",
    "select",
    "selectors",
    "socket",
    "ssl",
    "starlette",
    "threading",
    "time",
    "uvicorn",
}
"""What ``stamen.protocol`` must not import: it is sans-IO."""

TREE = {
    name
    for name, value in vars(stamen.errors).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}
"""The exception classes of the drawn tree."""

# Edges that other work in progress removes: (importing module, imported module). Each
# is named with its reason. Keep this list empty otherwise: a new edge is fixed, not listed.
KNOWN: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` (a module, at ``line``) imports ``target`` (a module)."""

    source: str
    target: str
    line: int
    file: str = ""

    def __str__(self) -> str:
        file = self.file or self.source.replace(".", "/") + ".py"
        return f"{self.source} -> {self.target}  ({file}:{self.line})"


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _exists(module: str) -> bool:
    path = ROOT.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "_pb" in path.relative_to(ROOT).parts:
            continue  # generated protobuf code
        found[_module_name(path)[0]] = path
    return found


def imports_of(path: Path, as_module: Path | None = None) -> tuple[list[Edge], set[str]]:
    """Every Stamen module ``path`` imports (anywhere in it), and the top-level names of
    the other libraries it imports; ``as_module``: read it as if it were that module."""
    source, is_package = _module_name(as_module or path)
    file = (as_module or path).relative_to(ROOT.parent).as_posix()
    package = source.split(".") if is_package else source.split(".")[:-1]
    edges: list[Edge] = []
    libraries: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stamen":
                    edges.append(Edge(source, alias.name, node.lineno, file))
                else:
                    libraries.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "stamen":
                libraries.add(module.split(".")[0])
                continue
            for alias in node.names:
                # ``from . import x``: the submodule x if there is one, else the package.
                submodule = f"{module}.{alias.name}"
                edges.append(Edge(source, submodule if _exists(submodule) else module, node.lineno))
    return edges, libraries


def unit_of(module: str) -> str:
    """The rank table's unit of a module: its first component under ``stamen``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def all_edges() -> list[Edge]:
    """Every import between Stamen modules, but the KNOWN ones."""
    edges: dict[Edge, None] = {}  # one per import statement and module, in order
    for path in _modules().values():
        edges.update((e, None) for e in imports_of(path)[0] if (e.source, e.target) not in KNOWN)
    return list(edges)


def upward(edges: list[Edge]) -> list[Edge]:
    """The edges from a unit to a unit of a higher rank, or to another of its rank."""
    return [
        e
        for e in edges
        if unit_of(e.source) != unit_of(e.target)
        and RANKS[unit_of(e.target)] >= RANKS[unit_of(e.source)]
    ]


def unit_cycles(edges: list[Edge]) -> list[list[str]]:
    """The cycles of the unit graph (each as its units, first repeated at the end)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        if unit_of(e.source) != unit_of(e.target):
            graph[unit_of(e.source)].add(unit_of(e.target))
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(unit: str) -> None:
        state[unit] = 1
        path.append(unit)
        for nxt in sorted(graph[unit]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit)
    return cycles


def _listing(edges: list[Edge]) -> str:
    return "\n  ".join(sorted(str(e) for e in edges))


def test_every_module_has_a_rank() -> None:
    """Every unit of src/stamen is in the rank table (a new package gets a rank)."""
    missing = sorted({unit_of(m) for m in _modules()} - set(RANKS))
    assert missing == [], f"units without a rank in RANKS: {missing}"


def test_no_import_goes_up() -> None:
    """No module imports a unit of a higher rank or another unit of its rank (imports in
    functions and under TYPE_CHECKING included)."""
    bad = upward(all_edges())
    assert not bad, "imports that go up (or sideways) in RANKS:\n  " + _listing(bad)


def test_no_import_cycle_between_units() -> None:
    """The unit graph has no cycle (implied by the ranks; kept for its clearer message)."""
    cycles = unit_cycles(all_edges())
    assert not cycles, "import cycles between units:\n  " + "\n  ".join(
        " -> ".join(c) for c in cycles
    )


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").rglob("*.py")), ids=lambda p: p.name)
def test_protocol_imports_no_io_library(path: Path) -> None:
    """stamen.protocol is sans-IO: it imports no network, thread, time or event-loop library."""
    libraries = imports_of(path)[1] & IO_LIBRARIES
    assert not libraries, f"{path.name} imports {sorted(libraries)}"


def test_no_import_of_another_packages_private_module() -> None:
    """A private module (``pkg/_x.py``) is imported only from within its package."""
    bad = []
    for e in all_edges():
        parts = e.target.split(".")
        for depth in range(2, len(parts)):
            if parts[depth].startswith("_") and not parts[depth].startswith("__"):
                owner = ".".join(parts[:depth])
                if not (e.source == owner or e.source.startswith(owner + ".")):
                    bad.append(e)
                break
    assert not bad, "imports of another package's private module:\n  " + _listing(bad)


def test_known_edges_still_exist() -> None:
    """Every KNOWN edge is still in the code (remove it from the list once it is fixed)."""
    present = {(e.source, e.target) for p in _modules().values() for e in imports_of(p)[0]}
    assert present >= KNOWN, f"fixed, remove from KNOWN: {sorted(KNOWN - present)}"


def test_every_public_exception_is_in_the_tree() -> None:
    """Public exception classes are defined in stamen/errors.py only (others re-export)."""
    outside = []
    for name, path in _modules().items():
        if name == "stamen.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in TREE for b in bases):
                    outside.append(f"{name}.{node.name}")
    assert outside == [], f"exceptions defined outside errors.py: {outside}"


# --- the checks catch what they are meant to -------------------------------------------


def test_checks_report_each_offending_edge() -> None:
    """Self-check: an upward edge and a cycle are reported, each with its source line."""
    sideways = Edge("stamen.server.app", "stamen.client.app", 11)
    down = Edge("stamen.client.app", "stamen.errors", 3)
    inside = Edge("stamen.client.app", "stamen.client.dispatch", 5)
    assert upward([sideways, down, inside]) == [sideways]
    wrong = Edge("stamen.messages", "stamen.wire.codec", 7)
    assert upward([wrong, down]) == [wrong]
    assert "stamen/messages.py:7" in _listing([wrong])
    back = Edge("stamen.client.app", "stamen.server.app", 4)
    assert unit_cycles([sideways, back]) == [["client", "server", "client"]]


def test_imports_in_functions_and_type_checking_count(tmp_path: Path) -> None:
    """Self-check: imports inside a function and under TYPE_CHECKING are edges too."""
    sample = ROOT / "protocol" / "session.py"  # a real module, to get a real package
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..wire import Payload\n"
        "def f():\n"
        "    import grpc\n"
        "    from ..server import app\n"
    )
    fake = tmp_path / "session.py"
    fake.write_text(source)
    edges, libraries = imports_of(fake, as_module=sample)
    assert {e.target for e in edges} == {"stamen.wire", "stamen.server.app"}
    assert "grpc" in libraries
