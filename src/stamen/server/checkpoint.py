"""Crash-safe checkpoints of a server's run: written atomically, verified on load.

After each completed round the server saves, in ``checkpoint_dir/round-NNNNNN/``:

* ``tensor-<i>.bin``: the global parameters' tensors as they are (``.npy`` bytes for NumPy
  models; the server never needs to understand them);
* ``history.json``: the run's History;
* ``strategy-values.json`` and ``strategy-<name>-<i>.npy``: the strategy's state
  (:class:`~stamen.server.strategy.state.StrategyState`; ``.npy`` read with
  ``allow_pickle=False``);
* ``manifest.json``, written last: format version, round, tensor type, and the SHA-256 and
  size of every other file.

A checkpoint is written into a temporary folder, every file and the folder are fsynced,
and the folder is renamed into place (then the parent is fsynced): a checkpoint either
exists completely or not at all, whenever the process dies. Loading verifies the manifest
and every digest; a corrupt or truncated checkpoint is reported and the newest good one is
used. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DecodeError
from ..messages import Parameters
from ..ndarrays import bytes_to_ndarray, ndarray_to_bytes
from .history import History
from .strategy.state import StrategyState

__all__ = ["Checkpoint", "Checkpointer"]

logger = logging.getLogger("stamen.server")

FORMAT_VERSION = 1
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Checkpoint:
    """What a server needs to resume after ``server_round``."""

    server_round: int
    parameters: Parameters
    history: History
    strategy_state: StrategyState = field(default_factory=StrategyState)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads checkpoints in one folder.

    Args:
        directory: The checkpoint folder (created if missing).
        keep: How many of the newest checkpoints to keep (at least 2, so that a corrupt
            newest one still leaves a good one).
        on_file_written: Called with each file's name as it is written (fault injection in
            tests: a test kills the process mid-write from here).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 2,
        on_file_written: Callable[[str], None] | None = None,
    ) -> None:
        if keep < 2:
            raise ConfigError(f"keep: expected an int >= 2, received {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self._on_file_written = on_file_written
        self.problems: list[str] = []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"checkpoint_dir: cannot create {self.directory}: {exc.strerror}"
            ) from exc

    # --- saving ------------------------------------------------------------------------

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` atomically; return its folder."""
        final = self.directory / f"round-{checkpoint.server_round:06d}"
        temp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        files: dict[str, dict[str, Any]] = {}

        def write(name: str, data: bytes | memoryview) -> None:
            with open(temp / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            if self._on_file_written is not None:
                self._on_file_written(name)

        for index, tensor in enumerate(checkpoint.parameters.tensors):
            write(f"tensor-{index}.bin", tensor)
        write("history.json", json.dumps(checkpoint.history.to_dict()).encode())
        state = checkpoint.strategy_state
        arrays_index: dict[str, int] = {}
        for number, (name, arrays) in enumerate(sorted(state.arrays.items())):
            arrays_index[name] = len(arrays)
            for index, array in enumerate(arrays):
                write(f"strategy-{number}-{index}.npy", ndarray_to_bytes(array))
        write("strategy-values.json", json.dumps(state.values, allow_nan=False).encode())
        manifest = {
            "format": FORMAT_VERSION,
            "round": checkpoint.server_round,
            "tensor_type": checkpoint.parameters.tensor_type,
            "tensors": len(checkpoint.parameters.tensors),
            "strategy_arrays": [[name, count] for name, count in sorted(arrays_index.items())],
            "files": files,
        }
        write("manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(temp)
        if final.exists():  # a round redone after a crash: replace it
            shutil.rmtree(final)
        os.rename(temp, final)
        _fsync_dir(self.directory)
        self._prune()
        logger.info("checkpoint of round %d written to %s", checkpoint.server_round, final)
        return final

    def _rounds(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _ROUND_DIR.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def _prune(self) -> None:
        for _, path in self._rounds()[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(".tmp-round-*"):
            shutil.rmtree(path, ignore_errors=True)

    # --- loading -----------------------------------------------------------------------

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None if there is none.

        Every checkpoint that fails verification is logged as an error and recorded in
        :attr:`problems` (what was wrong, and which one was used instead).
        """
        self.problems = []
        for server_round, path in self._rounds():
            try:
                checkpoint = self._load(path)
            except DecodeError as exc:
                problem = f"checkpoint {path} is corrupt and was skipped: {exc}"
                logger.error("%s", problem)
                self.problems.append(problem)
                continue
            if checkpoint.server_round != server_round:
                problem = f"checkpoint {path} claims round {checkpoint.server_round}"
                logger.error("%s", problem)
                self.problems.append(problem)
                continue
            return checkpoint
        return None

    def _load(self, path: Path) -> Checkpoint:
        def read(name: str) -> bytes:
            try:
                return (path / name).read_bytes()
            except OSError as exc:
                raise DecodeError(f"{name}: cannot read ({exc.strerror})") from exc

        try:
            manifest = json.loads(read("manifest.json"))
            if manifest["format"] != FORMAT_VERSION:
                raise DecodeError(
                    f"manifest.json: expected format {FORMAT_VERSION}, received "
                    f"{manifest['format']!r}"
                )
            files: dict[str, dict[str, Any]] = manifest["files"]
            contents: dict[str, bytes] = {}
            for name, meta in files.items():
                if not _NAME.match(name) or name == "manifest.json":
                    raise DecodeError(f"manifest.json: bad file name {name!r}")
                data = read(name)
                if len(data) != meta["size"]:
                    raise DecodeError(
                        f"{name}: expected {meta['size']} bytes, found {len(data)} (truncated?)"
                    )
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise DecodeError(f"{name}: SHA-256 mismatch (the file was altered)")
                contents[name] = data
            tensors: list[bytes | memoryview] = [
                contents[f"tensor-{i}.bin"] for i in range(int(manifest["tensors"]))
            ]
            parameters = Parameters(tensors=tensors, tensor_type=str(manifest["tensor_type"]))
            history = History.from_dict(json.loads(contents["history.json"]))
            arrays: dict[str, list[np.ndarray]] = {}
            for number, (name, count) in enumerate(manifest["strategy_arrays"]):
                arrays[str(name)] = [
                    bytes_to_ndarray(contents[f"strategy-{number}-{i}.npy"])
                    for i in range(int(count))
                ]
            values = json.loads(contents["strategy-values.json"])
            state = StrategyState(arrays=arrays, values=values)
            return Checkpoint(int(manifest["round"]), parameters, history, state)
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise DecodeError(f"malformed checkpoint: {exc!r}") from exc
