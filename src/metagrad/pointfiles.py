"""A task's points on disk, for ``metagrad adapt``: CSV, ``.npy`` or ``.npz``.

* support: a CSV or ``.npy`` table ``[K, d + 1]`` (inputs, then the target in the last column; a class label for
  classification), or an ``.npz`` with arrays ``x`` ``[K, ...]`` and ``y`` ``[K, ...]`` (any input shape, e.g.
  images);
* query: a CSV or ``.npy`` table ``[Q, d]``, or an ``.npz`` with ``x``.

CSV files may start with one header line of names; numbers are read as float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metagrad.errors import DataError

__all__ = ["read_points", "write_predictions"]

SUFFIXES = (".csv", ".npy", ".npz")


def _table(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
        if table.dtype.kind not in "biuf":
            raise DataError(f"{path} must hold numbers, got {table.dtype}")
        return table.astype(np.float64)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no rows")
    try:
        float(lines[0].split(",")[0])
    except ValueError:
        lines = lines[1:]  # a header line
    try:
        rows = [[float(v) for v in line.split(",")] for line in lines]
    except ValueError as e:
        raise DataError(f"{path} holds a value that is not a number ({e})") from None
    if len({len(r) for r in rows}) > 1:
        raise DataError(f"{path}: rows have different numbers of columns")
    return np.asarray(rows, dtype=np.float64)


def read_points(path: str | Path, with_targets: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, y)`` from a support file (``with_targets``) or ``(x, None)`` from a query file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: point files are {', '.join(SUFFIXES)}, got {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data or (with_targets and "y" not in data):
                    raise DataError(f"{path} must hold the arrays 'x'{' and y' if with_targets else ''}")
                arrays = [data["x"], data["y"]] if with_targets else [data["x"]]
            if any(a.dtype.kind not in "biuf" for a in arrays) or any(len(a) == 0 for a in arrays):
                raise DataError(f"{path}: 'x' and 'y' must be non-empty arrays of numbers")
            return arrays[0], (arrays[1] if with_targets else None)
        table = _table(path)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{path} could not be read ({e})") from None
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] < (2 if with_targets else 1):
        need = "inputs then the target" if with_targets else "inputs"
        raise DataError(f"{path} must be a table of rows ({need} in columns), got shape {table.shape}")
    return (table[:, :-1], table[:, -1:]) if with_targets else (table, None)


def write_predictions(path: str | Path | None, x: np.ndarray, predictions: np.ndarray) -> str:
    """Write the query inputs beside the predictions (CSV, or ``.npy`` of the predictions alone); with no path,
    return the CSV text."""
    flat_x = x.reshape(len(x), -1) if x.ndim > 1 else x[:, None]
    flat_p = predictions.reshape(len(predictions), -1)
    if path is not None and Path(path).suffix == ".npy":
        np.save(path, predictions)
        return ""
    head = [f"x{i}" for i in range(flat_x.shape[1])] if flat_x.shape[1] <= 16 else []
    head += [f"prediction{i}" if flat_p.shape[1] > 1 else "prediction" for i in range(flat_p.shape[1])]
    cols = [flat_x] if len(head) > flat_p.shape[1] else []
    body = np.concatenate([*cols, flat_p], axis=1)
    text = ",".join(head) + "\n" + "\n".join(",".join(f"{v:.6g}" for v in row) for row in body) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
