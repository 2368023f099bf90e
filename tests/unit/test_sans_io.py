"""``stamen.protocol`` and ``stamen.wire`` are sans-IO: no network or thread libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "stamen"

_PROBE = """
import sys
import stamen.protocol
import stamen.wire
roots = {name.split(".")[0] for name in sys.modules}
loaded = sorted(roots & {"grpc", "httpx", "h11", "httpcore", "requests", "aiohttp"})
print(",".join(loaded))
"""


def test_importing_protocol_and_wire_loads_no_network_library() -> None:
    """A fresh interpreter that imports stamen.protocol and stamen.wire has no grpc/httpx.

    (threading is not checked: the standard library's logging imports it.)
    """
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = [name for name in result.stdout.strip().split(",") if name]
    assert loaded == [], f"importing stamen.protocol/stamen.wire loaded {loaded}"


def _absolute_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a module (anywhere in it)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


PROTOCOL_FILES = sorted((SRC / "protocol").rglob("*.py"))
WIRE_FILES = sorted(p for p in (SRC / "wire").rglob("*.py") if "_pb" not in p.parts)


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=lambda p: p.name)
def test_protocol_modules_import_no_io(path: Path) -> None:
    """No module of stamen.protocol imports grpc, httpx, socket, threading, time or asyncio."""
    forbidden = {"grpc", "httpx", "socket", "threading", "time", "asyncio", "ssl", "select"}
    assert _absolute_imports(path) & forbidden == set()


@pytest.mark.parametrize("path", WIRE_FILES, ids=lambda p: p.name)
def test_wire_modules_import_no_network_library(path: Path) -> None:
    """No module of stamen.wire imports grpc, httpx, socket or threading."""
    forbidden = {"grpc", "httpx", "socket", "threading", "asyncio"}
    assert _absolute_imports(path) & forbidden == set()


def test_protocol_package_is_not_empty() -> None:
    """The static checks above have files to look at."""
    assert len(PROTOCOL_FILES) >= 4
    assert WIRE_FILES
