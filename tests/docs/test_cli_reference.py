"""docs/reference/cli.md shows each command's ``--help`` exactly as the command prints it.

Each ``<!-- help: ARGS -->`` comment in the page is followed by a ``text`` block that must
equal ``stamen ARGS --help`` (printed 100 columns wide). After changing the command line,
rewrite the blocks with ``STAMEN_UPDATE_DOCS=1 pytest tests/docs/test_cli_reference.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .programs import ROOT

PAGE = ROOT / "docs" / "reference" / "cli.md"
COMMANDS = [
    "",
    "demo",
    "keys",
    "keys generate",
    "certs",
    "certs generate",
    "server",
    "node",
    "plot",
]
_BLOCK = re.compile(r"<!-- help: ?(.*?) -->\n```text\n(.*?)```\n", re.DOTALL)


def help_text(command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "stamen", *command.split(), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        timeout=60,
        check=True,
    )
    return result.stdout


def test_every_command_is_documented_with_its_help() -> None:
    text = PAGE.read_text(encoding="utf-8")
    if os.environ.get("STAMEN_UPDATE_DOCS") == "1":
        text = _BLOCK.sub(
            lambda m: f"<!-- help: {m.group(1)} -->\n```text\n{help_text(m.group(1))}```\n", text
        )
        PAGE.write_text(text, encoding="utf-8")
    documented = {m.group(1): m.group(2) for m in _BLOCK.finditer(text)}
    assert sorted(documented) == sorted(COMMANDS)
    for command, shown in documented.items():
        assert shown == help_text(command), (
            f"docs/reference/cli.md: `stamen {command} --help` changed; "
            "rewrite with STAMEN_UPDATE_DOCS=1 pytest tests/docs/test_cli_reference.py"
        )
