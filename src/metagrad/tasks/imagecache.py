"""The on-disk cache of decoded images: one uint8 ``.npy`` array, memory-mapped, and a JSON record beside it.

Files live in ``default_cache_dir()`` (``$METAGRAD_CACHE``, else ``$XDG_CACHE_HOME/metagrad``, else
``~/.cache/metagrad``) as ``images-<key>.npy`` and ``images-<key>.json``. The key hashes the source files' names,
sizes and modification times with the decoding options, so a changed folder gets a new key and is decoded again.
Writes are atomic: the array is decoded into a hidden temporary file, renamed into place, and the JSON record,
written last and also by rename, is what makes an entry valid; a killed decode leaves no entry that a later load
would trust, and the next writer in that directory removes its temporary files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from metagrad.tasks.omniglot import default_cache_dir

__all__ = ["cache_key", "read_cache", "CacheWriter", "default_cache_dir", "CACHE_FORMAT"]

CACHE_FORMAT = "metagrad-images/1"


def cache_key(fingerprint: Any, options: dict[str, Any]) -> str:
    """A short hex digest of the sources' fingerprint (names, sizes, mtimes) and the decoding options."""
    text = json.dumps({"format": CACHE_FORMAT, "sources": fingerprint, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _paths(directory: Path, key: str) -> tuple[Path, Path]:
    return directory / f"images-{key}.npy", directory / f"images-{key}.json"


def read_cache(directory: str | os.PathLike, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached ``(images, record)`` for ``key``, images memory-mapped copy-on-write (writable for torch, the file
    never changes); ``None`` when there is no complete entry."""
    npy, record_path = _paths(Path(directory), key)
    try:
        record = json.loads(record_path.read_text())
        images = np.load(npy, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if record.get("format") != CACHE_FORMAT or list(images.shape) != record.get("shape") or images.dtype != np.uint8:
        return None
    return images, record


def _remove_stale(directory: Path) -> None:
    """Remove the temporary files (``.images-<key>.<pid>.npy.tmp`` and the like) of decodes whose process is gone
    (killed before it could clean up), so that a killed decode never leaves a large file behind for good."""
    for p in directory.glob(".images-*.tmp"):
        pids = [int(part) for part in p.name.split(".")[2:-1] if part.isdigit()]
        if not pids:
            continue
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:  # alive but not ours (PermissionError), or cannot tell: keep it
            pass


class CacheWriter:
    """Decode into ``writer.array`` (a temporary memory-mapped file, or memory when the cache directory is not
    writable), then :meth:`commit` it under ``key``; :meth:`discard` on failure."""

    def __init__(self, directory: str | os.PathLike | None, key: str, shape: tuple[int, ...]) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.key = key
        self.tmp: Path | None = None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                _remove_stale(self.directory)
                self.tmp = self.directory / f".images-{key}.{os.getpid()}.npy.tmp"
                self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=shape)
                return
            except OSError:  # a read-only cache only costs the next load its decoding time
                self.discard()
        self.array = np.empty(shape, dtype=np.uint8)

    def commit(self, record: dict[str, Any], channels: int | None = None) -> tuple[np.ndarray, Path | None]:
        """Keep the first ``channels`` channels (all by default), store the entry and return it (memory-mapped)
        with the path of its array (``None`` when nothing could be written)."""
        array = self.array
        if channels is not None and channels < array.shape[1]:
            array = np.ascontiguousarray(array[:, :channels])
        record = {**record, "format": CACHE_FORMAT, "shape": list(array.shape)}
        if self.tmp is None or self.directory is None:
            return array, None
        npy, record_path = _paths(self.directory, self.key)
        try:
            if array is self.array:
                self.array.flush()
                del self.array
                os.replace(self.tmp, npy)
            else:
                self.discard()
                tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, npy)
            tmp_record = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
            tmp_record.write_text(json.dumps(record))
            os.replace(tmp_record, record_path)
        except OSError:
            return np.asarray(array), None
        return np.load(npy, mmap_mode="c"), npy

    def discard(self) -> None:
        self.__dict__.pop("array", None)
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
