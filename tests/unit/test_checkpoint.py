"""Checkpoints: atomic, verified, no pickle; a corrupt one is reported and skipped."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pytest

from stamen.errors import ConfigError
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server.checkpoint import Checkpoint, Checkpointer
from stamen.server.history import History
from stamen.server.strategy.state import StrategyState


def _checkpoint(server_round: int) -> Checkpoint:
    history = History()
    history.add_loss_distributed(server_round, 0.5 / server_round)
    history.add_metrics_centralized(server_round, {"acc": 0.9, "tag": b"\x00\xff"})
    params = ndarrays_to_parameters(
        [np.full((2, 3), server_round, np.float32), np.arange(4, dtype=np.int64)]
    )
    state = StrategyState(
        arrays={"m_t": [np.full(3, 0.25 * server_round)], "v_t": [np.ones((2, 2)), np.zeros(1)]},
        values={"clip": 0.1 * server_round, "names": ["a", "b"], "seed": None},
    )
    return Checkpoint(server_round, params, history, state)


def _same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.server_round == b.server_round
    assert a.parameters == b.parameters
    assert a.history == b.history
    assert a.strategy_state.values == b.strategy_state.values
    assert a.strategy_state.arrays.keys() == b.strategy_state.arrays.keys()
    for name, arrays in a.strategy_state.arrays.items():
        for x, y in zip(arrays, b.strategy_state.arrays[name], strict=True):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype


def test_save_then_load_round_trips_everything(tmp_path: Path) -> None:
    """Parameters (bytes for bytes), History (bytes metrics too) and strategy state come
    back exactly; only the newest `keep` checkpoints remain."""
    keeper = Checkpointer(tmp_path, keep=2)
    for server_round in (1, 2, 3):
        keeper.save(_checkpoint(server_round))
    loaded = keeper.load_latest()
    assert loaded is not None
    _same(loaded, _checkpoint(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000002", "round-000003"]
    assert parameters_to_ndarrays(loaded.parameters)[1].dtype == np.int64


def test_empty_folder_has_no_checkpoint(tmp_path: Path) -> None:
    """A new folder means a new run."""
    assert Checkpointer(tmp_path / "new").load_latest() is None


@pytest.mark.parametrize(
    "damage",
    ["truncate-tensor", "flip-byte", "delete-file", "garbage-manifest", "missing-manifest"],
)
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_used(
    tmp_path: Path, damage: str
) -> None:
    """A truncated, altered or incomplete newest checkpoint is detected (size and SHA-256
    in the manifest), reported in `problems` with the file and the reason, and the
    previous good checkpoint is loaded."""
    keeper = Checkpointer(tmp_path)
    keeper.save(_checkpoint(1))
    newest = keeper.save(_checkpoint(2))
    tensor = newest / "tensor-0.bin"
    if damage == "truncate-tensor":
        tensor.write_bytes(tensor.read_bytes()[:-7])
    elif damage == "flip-byte":
        data = bytearray(tensor.read_bytes())
        data[-1] ^= 0xFF
        tensor.write_bytes(bytes(data))
    elif damage == "delete-file":
        (newest / "history.json").unlink()
    elif damage == "garbage-manifest":
        (newest / "manifest.json").write_bytes(b"{not json")
    else:
        (newest / "manifest.json").unlink()
    loaded = keeper.load_latest()
    assert loaded is not None
    _same(loaded, _checkpoint(1))
    [problem] = keeper.problems
    assert "round-000002 is corrupt" in problem


def test_manifest_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    """A manifest naming a file outside its folder is refused as corrupt, even when it
    is signed with the right key."""
    key = b"k" * 32
    keeper = Checkpointer(tmp_path, key=key)
    newest = keeper.save(_checkpoint(1))
    signed = json.loads((newest / "manifest.json").read_text())
    manifest = signed["manifest"]
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 0}
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    signed["hmac"] = hmac.new(key, body, hashlib.sha256).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(signed))
    assert keeper.load_latest() is None
    assert "bad file name" in keeper.problems[0]


def test_interrupted_write_leaves_no_checkpoint(tmp_path: Path) -> None:
    """A write that dies half-way leaves only a temporary folder, which is never loaded
    and is cleaned up by the next save."""

    class Died(Exception):
        pass

    def die_after_two(name: str) -> None:
        if name == "history.json":
            raise Died

    Checkpointer(tmp_path).save(_checkpoint(1))
    with pytest.raises(Died):
        Checkpointer(tmp_path, on_file_written=die_after_two).save(_checkpoint(2))
    keeper = Checkpointer(tmp_path)
    loaded = keeper.load_latest()
    assert loaded is not None
    assert loaded.server_round == 1
    assert keeper.problems == []
    keeper.save(_checkpoint(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001", "round-000002"]


def test_keep_must_leave_a_fallback(tmp_path: Path) -> None:
    """keep=1 would leave no good checkpoint behind a corrupt newest one: refused."""
    with pytest.raises(ConfigError, match="keep"):
        Checkpointer(tmp_path, keep=1)
