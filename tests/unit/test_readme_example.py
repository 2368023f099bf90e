"""The README's ClientApp/ServerApp example is examples/app_api.py, verbatim, and runs."""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

import stamen as fl

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "app_api.py"


def _readme_block() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"\(`examples/app_api\.py`\):\n\n(.*?)\n\s*```\n", readme, flags=re.DOTALL)
    assert match is not None, "README has no block introduced by (`examples/app_api.py`):"
    block = textwrap.dedent(match.group(1))
    assert block.startswith("```python\n")
    return block.removeprefix("```python\n") + "\n"


def test_readme_includes_the_example_verbatim() -> None:
    """The README's block equals examples/app_api.py (edit both or neither)."""
    assert _readme_block() == EXAMPLE.read_text()


def test_the_example_runs_in_a_simulation() -> None:
    """Its apps run under run_simulation: 3 rounds, the model moves by 5/3 a round."""
    spec = importlib.util.spec_from_file_location("readme_app_api", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_app_api"] = module
    try:
        spec.loader.exec_module(module)
        history = fl.simulation.run_simulation(
            server_app=module.server_app,
            client_app=module.app,
            num_supernodes=2,
            backend_name="sequential",
        )
    finally:
        sys.modules.pop("readme_app_api", None)
    # Weighted mean of +1 (weight 1) and +2 (weight 2): +5/3; loss = 3 * |w - 2|.
    losses = [loss for _, loss in history.losses_distributed]
    assert losses == pytest.approx([1.0, 4.0, 9.0], rel=1e-5)
