"""The generated protobuf code in ``src/stamen/wire/_pb`` is fresh."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PB_DIR = ROOT / "src" / "stamen" / "wire" / "_pb"


def _load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_stamen_gen_proto", ROOT / "scripts" / "gen_proto.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """Regenerating from wire/proto/*.proto gives byte-for-byte the committed _pb files.

    A .proto change without ``make proto`` fails here.
    """
    outputs = _load_gen_proto().generate(tmp_path)
    names = sorted(p.name for p in outputs)
    committed = sorted(
        p.name for p in PB_DIR.iterdir() if p.suffix in (".py", ".pyi") and p.stem != "__init__"
    )
    assert names == committed
    assert names  # at least the _pb2.py and its .pyi
    for name in names:
        fresh = (tmp_path / name).read_bytes()
        assert fresh == (PB_DIR / name).read_bytes(), f"{name} is stale: run `make proto`"
