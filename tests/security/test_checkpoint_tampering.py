"""Checkpoint tampering: a crafted checkpoint folder is refused, never resumed, and never
crashes or hangs the server; the loader falls back to the previous good checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from stamen.errors import ConfigError
from stamen.ndarrays import ndarrays_to_parameters
from stamen.server.checkpoint import Checkpoint, Checkpointer
from stamen.server.history import History


def _checkpoint(server_round: int) -> Checkpoint:
    history = History()
    history.add_loss_distributed(server_round, 1.0 / server_round)
    params = ndarrays_to_parameters([np.full(3, server_round, np.float32)])
    return Checkpoint(server_round, params, history)


def _two_rounds(folder: Path) -> tuple[Checkpointer, Path]:
    keeper = Checkpointer(folder)
    keeper.save(_checkpoint(1))
    return keeper, keeper.save(_checkpoint(2))


def _resumes_round_1(folder: Path, problem: str) -> None:
    """A fresh server on ``folder`` skips the tampered round 2 and resumes round 1."""
    fresh = Checkpointer(folder)
    loaded = fresh.load_latest()
    assert loaded is not None and loaded.server_round == 1
    assert len(fresh.problems) == 1 and problem in fresh.problems[0], fresh.problems


def _rewrite_manifest(newest: Path, change: object) -> None:
    (newest / "manifest.json").write_text(json.dumps(change))


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        ({"manifest": {"format": 2, "files": []}, "hmac": "0" * 64}, "HMAC"),
        ({"format": 1, "files": []}, "authenticated manifest"),
        ([1, 2, 3], "authenticated manifest"),
        ("deep", "nested deeper"),
    ],
    ids=["files-a-list", "old-format", "not-an-object", "deep-json"],
)
def test_malformed_manifests_fall_back_to_the_previous_checkpoint(
    tmp_path: Path, layout: object, problem: str
) -> None:
    """A manifest whose files is a list, of another layout, or nested 100,000 deep makes
    the loader skip that checkpoint (no AttributeError, no RecursionError)."""
    folder = tmp_path / "ckpt"
    _, newest = _two_rounds(folder)
    if layout == "deep":
        (newest / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        _rewrite_manifest(newest, layout)
    _resumes_round_1(folder, problem)


def test_a_forged_checkpoint_with_recomputed_digests_is_refused(tmp_path: Path) -> None:
    """round-999999 with a forged model, every digest recomputed, is refused: its
    manifest's HMAC does not verify under the key kept outside the folder."""
    folder = tmp_path / "ckpt"
    _, newest = _two_rounds(folder)
    forged = folder / "round-999999"
    forged.mkdir()
    files = {}
    for path in newest.iterdir():
        if path.name == "manifest.json":
            continue
        data = path.read_bytes()
        if path.name.startswith("tensor-"):
            data = data[:-12] + np.full(3, 666, np.float32).tobytes()
        (forged / path.name).write_bytes(data)
        files[path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    signed = json.loads((newest / "manifest.json").read_text())
    signed["manifest"].update(round=999999, files=files)
    _rewrite_manifest(forged, signed)
    fresh = Checkpointer(folder)
    loaded = fresh.load_latest()
    assert loaded is not None and loaded.server_round == 2
    assert "HMAC does not verify" in fresh.problems[0]


def test_the_key_lives_outside_the_folder_and_only_its_owner_reads_it(tmp_path: Path) -> None:
    """The default key is created beside the folder, mode 0600, and reused; a key file
    inside the folder is refused."""
    folder = tmp_path / "ckpt"
    Checkpointer(folder).save(_checkpoint(1))
    key_file = tmp_path / "ckpt.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Checkpointer(folder).load_latest() is not None  # same key, read back
    with pytest.raises(ConfigError, match="outside the checkpoint folder"):
        Checkpointer(folder, key_file=folder / "inside.key")


def test_another_key_refuses_every_checkpoint(tmp_path: Path) -> None:
    """Checkpoints written under one key do not verify under another."""
    folder = tmp_path / "ckpt"
    _two_rounds(folder)
    other = Checkpointer(folder, key=b"x" * 32)
    assert other.load_latest() is None
    assert all("HMAC" in problem for problem in other.problems)


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-dev-zero", "symlinked-folder"])
def test_files_that_are_not_regular_are_refused_without_reading(tmp_path: Path, kind: str) -> None:
    """A FIFO (which would block a reader for ever) or a link to /dev/zero (which reads
    without end) in place of a checkpoint file, or a round folder that is a link, are
    refused before any read; the previous checkpoint is used."""
    folder = tmp_path / "ckpt"
    _, newest = _two_rounds(folder)
    target = newest / "tensor-0.bin"
    if kind == "fifo":
        target.unlink()
        os.mkfifo(target)
        _resumes_round_1(folder, "regular file")
    elif kind == "symlink-to-dev-zero":
        target.unlink()
        target.symlink_to("/dev/zero")
        _resumes_round_1(folder, "a link?")
    else:
        outside = tmp_path / "elsewhere"
        newest.rename(outside)
        (folder / "round-000003").symlink_to(outside, target_is_directory=True)
        loaded = Checkpointer(folder).load_latest()
        assert loaded is not None and loaded.server_round == 1


def test_a_file_larger_than_its_manifest_says_is_not_read(tmp_path: Path) -> None:
    """Sizes are checked with stat before reading: a grown file is refused."""
    folder = tmp_path / "ckpt"
    _, newest = _two_rounds(folder)
    with open(newest / "history.json", "ab") as handle:
        handle.write(b" " * 1000)
    _resumes_round_1(folder, "expected")


def test_pruning_never_deletes_the_checkpoint_a_run_resumed_from(tmp_path: Path) -> None:
    """A run resumed from round 1 (round 2 bad) keeps round 1 when it saves round 3 with
    keep=2, so that a round 3 found bad later still leaves a good checkpoint; once two
    newer good ones exist, it goes."""
    folder = tmp_path / "ckpt"
    _, newest = _two_rounds(folder)
    (newest / "manifest.json").write_text("{}")  # round 2 is now bad
    resumed = Checkpointer(folder, keep=2)
    loaded = resumed.load_latest()
    assert loaded is not None and loaded.server_round == 1
    third = resumed.save(_checkpoint(3))
    assert (folder / "round-000001").is_dir()
    with open(third / "history.json", "ab") as handle:
        handle.write(b"!")  # round 3 damaged afterwards
    again = Checkpointer(folder).load_latest()
    assert again is not None and again.server_round == 1
    resumed.save(_checkpoint(4))
    resumed.save(_checkpoint(5))
    assert sorted(p.name for p in folder.iterdir()) == ["round-000004", "round-000005"]
