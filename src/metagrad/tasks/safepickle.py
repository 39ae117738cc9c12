"""Reading the pickled arrays that few-shot data sets are distributed as, without running their code.

learn2learn's ``mini-imagenet-cache-{split}.pkl`` and MetaOptNet's miniImageNet, CIFAR-FS and FC100 ``*.pickle``
files are plain containers of numpy arrays, but ``pickle.load`` would run whatever a tampered file names. The
unpickler here resolves only the globals numpy needs to rebuild an array (and the ``_codecs.encode`` that Python 3
uses for bytes in protocol 2): anything else is refused before it is called, and the result is then checked to be
made only of dicts, lists, tuples, strings, bytes, numbers and numpy arrays of plain (non-object) dtypes.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from metagrad.errors import DataError

__all__ = ["UnsafePickleError", "load_safe_pickle", "SAFE_GLOBALS"]

# (module, name) pairs a numpy-array pickle may name, across numpy 1.x ("numpy.core") and 2.x ("numpy._core").
SAFE_GLOBALS = frozenset(
    [(core, n) for core in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")]
    + [(core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)
_PLAIN = (str, bytes, int, float, bool, type(None), np.integer, np.floating, np.bool_)


class UnsafePickleError(DataError):
    """A pickle names code to run, or holds something other than arrays, dicts, lists, strings and numbers."""


class _Restricted(pickle.Unpickler):
    def __init__(self, file: Any, where: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles (MetaOptNet's) hold latin-1 byte strings
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.where}: refused to unpickle {module}.{name} (only numpy arrays, dicts, lists, strings and numbers "
            "are read); re-save the data as plain arrays or use another layout"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.where}: refused a persistent reference in the pickle")


def _check(value: Any, where: str, depth: int = 0) -> None:
    if depth > 32:
        raise UnsafePickleError(f"{where}: nested deeper than 32 levels")
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise UnsafePickleError(f"{where}: holds an array of Python objects (dtype {value.dtype})")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check(k, where, depth + 1)
            _check(v, where, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            _check(v, where, depth + 1)
    elif not isinstance(value, _PLAIN):
        kind = type(value).__name__
        raise UnsafePickleError(f"{where}: holds a {kind}, not arrays, dicts, lists, strings or numbers")


def load_safe_pickle(path: str | os.PathLike) -> Any:
    """The contents of the pickle at ``path``, read with the restricted unpickler (see the module docstring).

    Raises :class:`UnsafePickleError` naming the file for anything outside arrays, dicts, lists, strings and
    numbers, and :class:`~metagrad.errors.DataError` for a file that is unreadable or not a pickle."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        value = _Restricted(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways inside pickle
        raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); is the file complete?") from None
    _check(value, str(path))
    return value
