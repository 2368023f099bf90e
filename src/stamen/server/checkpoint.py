"""Crash-safe checkpoints of a server's run: written atomically, verified on load.

After each completed round the server saves, in ``checkpoint_dir/round-NNNNNN/``:

* ``tensor-<i>.bin``: the global parameters' tensors as they are (``.npy`` bytes for NumPy
  models; the server never needs to understand them);
* ``history.json``: the run's History;
* ``strategy-values.json`` and ``strategy-<name>-<i>.npy``: the strategy's state
  (:class:`~stamen.server.strategy.state.StrategyState`; ``.npy`` read with
  ``allow_pickle=False``);
* ``manifest.json``, written last: format version, round, tensor type, the SHA-256 and
  size of every other file, and an HMAC-SHA256 of all that under the server's checkpoint
  key.

A checkpoint is written into a temporary folder, every file and the folder are fsynced,
and the folder is renamed into place (then the parent is fsynced): a checkpoint either
exists completely or not at all, whenever the process dies. Loading verifies the manifest
and every digest; a corrupt or truncated checkpoint is reported and the newest good one is
used. No pickle anywhere.

Loading trusts nothing in the folder: the manifest must carry a valid HMAC under the
checkpoint key, which the server keeps **outside** the checkpoint folder (by default
``<folder>.key`` beside it, created with mode 0600; or given to ``start_server``), so a
checkpoint forged with recomputed digests is refused; only regular files are read (no
symlinks, FIFOs or devices), each file's size is checked with ``stat`` against the
manifest before it is read, JSON nesting is bounded, and any error of a candidate makes
the loader fall back to the previous checkpoint. Pruning never deletes one of the newest
``keep`` checkpoints known good.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import stat
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

FORMAT_VERSION = 2
"""2: the manifest is authenticated (1 had digests only, and is refused)."""
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_LIMIT = 16 << 20
"""Bytes a manifest may have (it lists a few files per tensor)."""
_JSON_DEPTH = 32
"""Nesting a checkpoint's JSON may have (History and strategy values are shallow)."""
_KEY_BYTES = 32


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
        key: The key that authenticates manifests (at least 16 bytes). Default: read from
            ``key_file``, created there with 32 random bytes if missing.
        key_file: Where the key is kept; default ``<directory>.key`` beside the folder.
            Keep it outside the checkpoint folder: whoever can write both can forge a
            checkpoint.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 2,
        on_file_written: Callable[[str], None] | None = None,
        key: bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if keep < 2:
            raise ConfigError(f"keep: expected an int >= 2, received {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self._on_file_written = on_file_written
        self.problems: list[str] = []
        self._good: set[Path] = set()
        """Checkpoints known good: written by this server, or loaded after verifying."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"checkpoint_dir: cannot create {self.directory}: {exc.strerror}"
            ) from exc
        if key is None:
            where = Path(key_file) if key_file is not None else _default_key_file(self.directory)
            key = _load_or_create_key(where, self.directory)
        if not isinstance(key, bytes) or len(key) < 16:
            raise ConfigError("checkpoint key: expected at least 16 bytes")
        self._key = key

    def _sign(self, manifest: dict[str, Any]) -> str:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

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
        signed = {"manifest": manifest, "hmac": self._sign(manifest)}
        write("manifest.json", json.dumps(signed, indent=1).encode())
        _fsync_dir(temp)
        if final.exists():  # a round redone after a crash: replace it
            shutil.rmtree(final)
        os.rename(temp, final)
        _fsync_dir(self.directory)
        self._good.add(final)
        self._prune()
        logger.info("checkpoint of round %d written to %s", checkpoint.server_round, final)
        return final

    def _rounds(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _ROUND_DIR.match(path.name)
            if match and stat.S_ISDIR(path.lstat().st_mode):  # a link to a folder is not one
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def _prune(self) -> None:
        """Remove checkpoints beyond the newest ``keep``, but never one of the newest
        ``keep`` known good (a run resumed from an older checkpoint because newer ones
        were bad keeps it until enough good ones follow)."""
        rounds = self._rounds()
        good = [path for _, path in rounds if path in self._good][: self.keep]
        for _, path in rounds[self.keep :]:
            if path not in good:
                shutil.rmtree(path, ignore_errors=True)
                self._good.discard(path)
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
            except Exception as exc:  # whatever a crafted folder makes go wrong: skip it
                reason = exc if isinstance(exc, DecodeError) else repr(exc)
                problem = f"checkpoint {path} is corrupt or forged and was skipped: {reason}"
                logger.error("%s", problem)
                self.problems.append(problem)
                continue
            if checkpoint.server_round != server_round:
                problem = f"checkpoint {path} claims round {checkpoint.server_round}"
                logger.error("%s", problem)
                self.problems.append(problem)
                continue
            self._good.add(path)
            return checkpoint
        return None

    def _load(self, path: Path) -> Checkpoint:
        manifest = self._verified_manifest(path)
        try:
            files: dict[str, dict[str, Any]] = manifest["files"]
            contents = {
                name: _read_regular(path / name, meta["size"], meta["sha256"])
                for name, meta in files.items()
            }
            tensors: list[bytes | memoryview] = [
                contents[f"tensor-{i}.bin"] for i in range(int(manifest["tensors"]))
            ]
            parameters = Parameters(tensors=tensors, tensor_type=str(manifest["tensor_type"]))
            history = History.from_dict(_bounded_json("history.json", contents["history.json"]))
            arrays: dict[str, list[np.ndarray]] = {}
            for number, (name, count) in enumerate(manifest["strategy_arrays"]):
                arrays[str(name)] = [
                    bytes_to_ndarray(contents[f"strategy-{number}-{i}.npy"])
                    for i in range(int(count))
                ]
            values = _bounded_json("strategy-values.json", contents["strategy-values.json"])
            state = StrategyState(arrays=arrays, values=values)
            return Checkpoint(int(manifest["round"]), parameters, history, state)
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise DecodeError(f"malformed checkpoint: {exc!r}") from exc

    def _verified_manifest(self, path: Path) -> dict[str, Any]:
        """The manifest of the checkpoint in ``path``, once its HMAC and layout check.

        Raises:
            DecodeError: unreadable, malformed, unauthenticated or forged.
        """
        signed = _bounded_json("manifest.json", _read_regular(path / "manifest.json", None))
        if not isinstance(signed, dict) or set(signed) != {"manifest", "hmac"}:
            raise DecodeError(
                f"manifest.json: expected an authenticated manifest (format {FORMAT_VERSION}), "
                "received another layout"
            )
        manifest, tag = signed["manifest"], signed["hmac"]
        if not isinstance(manifest, dict) or not isinstance(tag, str):
            raise DecodeError("manifest.json: expected an object and its HMAC")
        if not hmac.compare_digest(tag, self._sign(manifest)):
            raise DecodeError(
                "manifest.json: the HMAC does not verify under this server's checkpoint key "
                "(forged, altered, or written with another key)"
            )
        if manifest.get("format") != FORMAT_VERSION:
            raise DecodeError(
                f"manifest.json: expected format {FORMAT_VERSION}, received "
                f"{manifest.get('format')!r}"
            )
        _check_files(manifest.get("files"))
        return manifest


def _check_files(files: object) -> None:
    """The manifest's ``files``: a mapping of plain names to their size and SHA-256."""
    if not isinstance(files, dict):
        raise DecodeError(f"manifest.json: files: expected an object, received {files!r:.60}")
    for name, meta in files.items():
        if not _NAME.match(name) or name == "manifest.json":
            raise DecodeError(f"manifest.json: bad file name {name!r}")
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("size"), int)
            and not isinstance(meta.get("size"), bool)
            and meta["size"] >= 0
            and isinstance(meta.get("sha256"), str)
            and _HEX64.match(meta["sha256"])
        ):
            raise DecodeError(f"manifest.json: {name}: expected a size and a SHA-256")


def _read_regular(path: Path, size: int | None, sha256: str | None = None) -> bytes:
    """The bytes of ``path``, a regular file (never a link, FIFO or device) of exactly
    ``size`` bytes (None: at most the manifest limit), checked with ``stat`` before a
    byte is read, and against ``sha256``.

    Raises:
        DecodeError: anything else.
    """
    name = path.name
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO put there cannot hang the server
    except OSError as exc:
        raise DecodeError(f"{name}: cannot open ({exc.strerror}; a link?)") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DecodeError(f"{name}: expected a regular file, found something else")
        limit = _MANIFEST_LIMIT if size is None else size
        if info.st_size > limit or (size is not None and info.st_size != size):
            raise DecodeError(
                f"{name}: expected {'at most ' if size is None else ''}{limit} bytes, "
                f"found {info.st_size} (truncated or altered?)"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise DecodeError(f"{name}: cannot read ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise DecodeError(f"{name}: changed while it was read")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DecodeError(f"{name}: SHA-256 mismatch (the file was altered)")
    return data


def _bounded_json(name: str, data: bytes) -> Any:
    """Parse JSON whose nesting is at most :data:`_JSON_DEPTH` (checked before parsing:
    deep nesting would otherwise exhaust the parser's recursion).

    Raises:
        DecodeError: not such JSON.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > _JSON_DEPTH:
                raise DecodeError(f"{name}: JSON nested deeper than {_JSON_DEPTH} levels")
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{name}: not valid JSON ({exc})") from exc


def _default_key_file(directory: Path) -> Path:
    return directory.parent / f"{directory.name}.key"


def _load_or_create_key(where: Path, directory: Path) -> bytes:
    """The checkpoint key kept in ``where`` (hex), created (mode 0600) if missing.

    Raises:
        ConfigError: the file is inside the checkpoint folder, is not a regular file, or
            does not hold a key.
    """
    resolved = where.resolve()
    if resolved == directory.resolve() or directory.resolve() in resolved.parents:
        raise ConfigError(
            f"checkpoint key file: expected a path outside the checkpoint folder {directory}, "
            f"received {where}"
        )
    try:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        text = _read_regular(where, None).decode("ascii", "replace").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError as exc:
            raise ConfigError(
                f"checkpoint key file {where}: expected hex, found {text!r:.40}"
            ) from exc
        return key
    except OSError as exc:
        raise ConfigError(f"checkpoint key file {where}: cannot create ({exc.strerror})") from exc
    key = secrets.token_bytes(_KEY_BYTES)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex() + "\n")
    logger.info("created the checkpoint key %s (keep it; it authenticates checkpoints)", where)
    return key
