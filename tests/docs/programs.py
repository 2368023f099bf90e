"""Find the programs in the documentation's Markdown, so that tests can run them.

A fenced code block is a program when an HTML comment right before it says so (the
comment is invisible on the site and on GitHub):

* ``<!-- run -->``: run the block (``python`` or ``bash`` by its language) in an empty
  folder, and expect exit code 0.
* ``<!-- run name=app.py procs="server | client 1 | client 3" -->``: save the block as
  ``app.py`` and run it once per ``|``-separated argument list, at the same time (the first
  one first; the others once the page's port accepts connections). Every process must exit
  0.
* ``<!-- file name=server.py -->``: save the block as ``server.py`` beside the page's
  programs, without running it.
* more keys of ``run``: ``requires=MODULE`` (skipped, saying so, when it is not
  importable), ``timeout=SECONDS`` (default 120), ``expect=REGEX`` (searched in what the
  first process printed), ``cwd=repo`` (run in the repository's root, not in the folder).

``127.0.0.1:8080`` in a page's blocks becomes ``127.0.0.1:<a free port>`` (one per page),
so programs written for a reader's terminal run next to each other in the tests. A block
whose only lines are snippet includes (``--8<-- "path"``, from the repository's root) runs
the included files' text.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PORT_TEXT = "127.0.0.1:8080"

_MARKER = re.compile(r"^([ \t]*)<!--\s*(run|file)\b(.*?)-->[ \t]*\n", re.MULTILINE)
_FENCE = re.compile(r"([ \t]*)(```+)(\w*)[^\n]*\n(.*?)\n\1\2[ \t]*(\n|$)", re.DOTALL)
_SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$')


@dataclass
class Block:
    """One marked code block of a page."""

    page: Path
    line: int
    kind: str  # "run" or "file"
    language: str
    code: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        default = "program.sh" if self.language in ("sh", "bash") else "program.py"
        return self.options.get("name", default)

    @property
    def procs(self) -> list[list[str]]:
        text = self.options.get("procs")
        if text is None:
            return [[]]
        return [shlex.split(part) for part in text.split("|")]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _resolve_snippets(code: str) -> str:
    lines = [line for line in code.splitlines() if line.strip()]
    matches = [_SNIPPET.match(line.strip()) for line in lines]
    if not lines or not all(matches):
        return code
    return "".join((ROOT / m.group(1)).read_text(encoding="utf-8") for m in matches if m)


def blocks_of(page: Path) -> list[Block]:
    """Every marked block of ``page``, in order.

    Raises:
        ValueError: a marker is not followed by a fenced code block.
    """
    text = page.read_text(encoding="utf-8")
    found = []
    for marker in _MARKER.finditer(text):
        fence = _FENCE.match(text, marker.end())
        line = text.count("\n", 0, marker.start()) + 1
        if fence is None:
            raise ValueError(f"{page}:{line}: a <!-- {marker.group(2)} --> without a code block")
        options = dict(word.split("=", 1) for word in shlex.split(marker.group(3)))
        code = textwrap.dedent(fence.group(1) + fence.group(4))
        found.append(
            Block(page, line, marker.group(2), fence.group(3), _resolve_snippets(code), options)
        )
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks_of(page)]
