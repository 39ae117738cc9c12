"""Checkpoint files: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory ``weights.safetensors`` (the learner's params, meta_state and extra state),
``trainer.safetensors`` (optimizer moments, RNG states) and ``trainer.json`` (iteration, config, optimizer
hyper-parameters, SHA-256 of both tensor files). It is written into a temporary directory, every file
flushed and fsync'ed, then renamed into place, so a kill at any moment leaves either the old checkpoint or
the new one. Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from metagrad.errors import CheckpointError

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "write_atomic", "read_json"]

FORMAT = "metagrad-checkpoint/1"
WEIGHTS, TRAINER, META = "weights.safetensors", "trainer.safetensors", "trainer.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write(tmp, data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(
    directory: str | Path, weights: dict[str, Tensor], trainer: dict[str, Tensor], meta: dict[str, Any]
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one of the same name)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    blobs = {WEIGHTS: st_save(_contiguous(weights)), TRAINER: st_save(_contiguous(trainer))}
    for name, blob in blobs.items():
        _write(tmp / name, blob)
    meta = {**meta, "format": FORMAT, "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}}
    _write(tmp / META, json.dumps(meta, indent=1).encode())
    _fsync_dir(tmp)
    if directory.exists():
        # A directory cannot be renamed over a non-empty one: move the old aside first; a crash between
        # the two renames leaves it under the trash name, which load_checkpoint's callers still skip.
        trash = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, trash)
        os.replace(tmp, directory)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    return directory


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a metagrad file (expected a JSON object)")
    return data


def load_checkpoint(
    directory: str | Path, weights_only: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: (weights, trainer tensors, metadata). Raises CheckpointError."""
    directory = Path(directory)
    meta = read_json(directory / META)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META} is not a {FORMAT} file (format {meta.get('format')!r})")
    names = [WEIGHTS] if weights_only else [WEIGHTS, TRAINER]
    out = []
    for name in names:
        path = directory / name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256", {}).get(name):
            raise CheckpointError(f"{path} is truncated or corrupted (checksum mismatch)")
        try:
            out.append(st_load(blob))
        except (SafetensorError, ValueError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    return out[0], (out[1] if len(out) > 1 else {}), meta
