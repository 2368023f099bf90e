"""Regenerate src/stamen/wire/_pb/ from src/stamen/wire/proto/*.proto.

Usage: python scripts/gen_proto.py [OUT_DIR]   (default: the committed _pb/ folder)

tests/unit/test_wire_generated.py runs this into a temporary folder and fails when the
committed files differ, so a .proto change without regeneration cannot land.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "src" / "stamen" / "wire" / "proto"
DEFAULT_OUT = ROOT / "src" / "stamen" / "wire" / "_pb"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugin; return the outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    plugin = Path(sys.executable).with_name("protoc-gen-mypy")
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(
        p for p in out_dir.iterdir() if p.suffix in (".py", ".pyi") and p.stem != "__init__"
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path)
