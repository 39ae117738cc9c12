"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): loading, class splits, rotations, Lake's 20 runs.

The data is read where it lies, from the zip files or from their extracted folders, never copied:

* ``load_omniglot(root)`` decodes every ``images_*`` source under ``root`` (``images_background.zip``,
  ``images_evaluation.zip``, ``images_background_small1.zip``, ... or the folders they extract to, whose layout
  is ``<source>/<Alphabet>/<characterNN>/*.png``), deduplicates characters that appear in several sources
  (the two "small" background subsets share Greek and Latin), resizes 105x105 -> 28x28 and inverts so that
  strokes are 1 and the background 0. The decoded tensor is cached as one safetensors file keyed on the
  sources' names, sizes and modification times, so later loads take milliseconds.
* ``split_classes`` splits the classes into train/val/test by alphabet or by character, seeded.
* ``augment_rotations`` adds the 90/180/270 degree rotations of every character as new classes, as in the
  MAML and Reptile experiments (Santoro et al. 2016's augmentation).
* ``load_lake_runs`` reads the 20 within-alphabet 20-way one-shot runs of the Science paper (``all_runs.zip``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metagrad.registry import register_task
from metagrad.tasks.base import TaskBatch
from metagrad.tasks.episodes import EpisodeSampler

__all__ = [
    "Omniglot",
    "OmniglotConfig",
    "OmniglotData",
    "LakeRun",
    "load_omniglot",
    "split_classes",
    "augment_rotations",
    "load_lake_runs",
    "lake_task_batch",
    "alphabet_of",
    "default_cache_dir",
    "ROTATION_SEPARATOR",
]

_CACHE_VERSION = "1"
ROTATION_SEPARATOR = "@"  # "Greek/character03@90": the 90-degree rotation of Greek/character03
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


class OmniglotData(NamedTuple):
    """``images`` [N, 1, size, size] (float in [0, 1], or uint8 in 0..255; strokes high, background 0),
    ``labels`` [N] (int64 indices into ``class_names``), ``class_names`` ("Alphabet/characterNN", sorted)."""

    images: Tensor
    labels: Tensor
    class_names: list[str]


# ----- decoding ---------------------------------------------------------------------------------------


def _decode(data: bytes, size: int, resample: str) -> np.ndarray:
    """One PNG -> uint8 [size, size], ink = 255. Converted to 8-bit grey *before* resizing: Pillow resizes a
    1-bit image with nearest neighbour whatever filter is asked for."""
    with Image.open(io.BytesIO(data)) as im:
        grey = im.convert("L")
    if grey.size != (size, size):
        grey = grey.resize((size, size), resample=_RESAMPLE[resample])
    return 255 - np.asarray(grey, dtype=np.uint8)


class _Source:
    """A zip file or a folder holding ``.../<Alphabet>/<character>/<drawing>.png``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()

    def members(self) -> list[tuple[str, str, str]]:
        """(alphabet, character, member) for every PNG, member being the name inside the source."""
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if n.lower().endswith(".png")]
        else:
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*.png")]
        out = []
        for n in names:
            parts = PurePosixPath(n).parts
            if len(parts) >= 3:
                out.append((parts[-3], parts[-2], n))
        return out

    def read(self, members: Sequence[str]) -> Iterator[bytes]:
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                for m in members:
                    yield z.read(m)
        else:
            for m in members:
                yield (self.path / m).read_bytes()

    def fingerprint(self) -> list:
        if self.is_zip:
            st = self.path.stat()
            return [self.path.name, st.st_size, st.st_mtime_ns]
        files = sorted(self.path.rglob("*.png"))
        stats = [(p.relative_to(self.path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return [self.path.name + "/", stats]


def _find_sources(root: Path) -> list[_Source]:
    """``root`` itself if it is a zip; else its ``images_*`` zips and folders (a folder wins over the zip of
    the same stem); else ``root`` as one folder."""
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise ValueError(f"{root} is neither a folder nor a zip file")
        return [_Source(root)]
    if not root.is_dir():
        raise FileNotFoundError(f"Omniglot root {root} does not exist")
    by_stem: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if not p.name.startswith("images_"):
            continue
        if p.is_dir():
            by_stem[p.name] = p
        elif p.suffix.lower() == ".zip":
            by_stem.setdefault(p.stem, p)
    if by_stem:
        return [_Source(by_stem[s]) for s in sorted(by_stem)]
    return [_Source(root)]


def default_cache_dir() -> Path:
    """``$METAGRAD_CACHE``, else ``$XDG_CACHE_HOME/metagrad``, else ``~/.cache/metagrad``."""
    if os.environ.get("METAGRAD_CACHE"):
        return Path(os.environ["METAGRAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metagrad"


def _decode_all(sources: list[_Source], size: int, resample: str) -> tuple[Tensor, Tensor, list[str]]:
    # Deduplicate by alphabet/character: the first source (sorted by name) that holds a character wins.
    owner: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for i, src in enumerate(sources):
        found: dict[str, list[str]] = {}
        for alphabet, character, m in src.members():
            found.setdefault(f"{alphabet}/{character}", []).append(m)
        for name, ms in found.items():
            if name not in owner:
                owner[name] = i
                members[name] = sorted(ms, key=lambda m: PurePosixPath(m).name)
    if not members:
        raise FileNotFoundError(
            f"no Omniglot images (<Alphabet>/<character>/*.png) under {[str(s.path) for s in sources]}"
        )
    class_names = sorted(members)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i, src in enumerate(sources):
        mine = [(c, name) for c, name in enumerate(class_names) if owner[name] == i]
        flat = [m for _, name in mine for m in members[name]]
        decoded = [_decode(b, size, resample) for b in src.read(flat)]
        pos = 0
        for c, name in mine:
            n = len(members[name])
            images.append(np.stack(decoded[pos : pos + n]))
            labels.extend([c] * n)
            pos += n
    order = np.argsort(np.asarray(labels), kind="stable")  # class-major, drawings in file-name order
    stacked = torch.from_numpy(np.concatenate(images)[order].copy())[:, None]
    return stacked, torch.as_tensor(labels, dtype=torch.int64)[torch.from_numpy(order)], class_names


def load_omniglot(
    root: str | os.PathLike,
    size: int = 28,
    cache: bool = True,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    resample: str = "lanczos",
) -> OmniglotData:
    """Every Omniglot character under ``root`` as ``(images, labels, class_names)``.

    ``root`` is a folder holding ``images_*.zip`` files and/or their extracted folders, one such zip, or one
    extracted folder. Images are [N, 1, size, size], class-major, strokes high and background 0: float in
    [0, 1] for a floating ``dtype``, the raw 0..255 for ``torch.uint8`` (a quarter of the memory). ``resample``
    is the Pillow filter for 105 -> ``size``: "lanczos" (default, as the MAML code), "box" or "bilinear".
    With ``cache`` the decoded uint8 tensor is stored once in ``cache_dir`` (default ``default_cache_dir()``)
    as a safetensors file keyed on the sources' names, sizes and modification times.
    """
    if int(size) <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    size = int(size)
    sources = _find_sources(Path(root).expanduser().resolve())
    loaded = None
    path = None
    if cache:
        where = [str(s.path) for s in sources]
        key = json.dumps([_CACHE_VERSION, size, resample, where, [s.fingerprint() for s in sources]])
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        folder = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
        path = folder / f"omniglot-{digest}.safetensors"
        loaded = _read_cache(path)
    if loaded is None:
        loaded = _decode_all(sources, size, resample)
        if path is not None:
            _write_cache(path, *loaded)
    images, labels, class_names = loaded
    if dtype != torch.uint8:
        images = images.to(dtype) / 255
    return OmniglotData(images, labels, class_names)


def _read_cache(path: Path) -> tuple[Tensor, Tensor, list[str]] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "metagrad-omniglot" or meta.get("version") != _CACHE_VERSION:
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
            names = json.loads(meta["class_names"])
    except Exception:  # a truncated or foreign file: decode again and overwrite it
        return None
    if images.dtype != torch.uint8 or labels.shape != images.shape[:1] or len(names) != int(labels.max()) + 1:
        return None
    return images, labels, names


def _write_cache(path: Path, images: Tensor, labels: Tensor, names: list[str]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = {"format": "metagrad-omniglot", "version": _CACHE_VERSION, "class_names": json.dumps(names)}
        save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError:  # a read-only cache directory only costs the next load its decoding time
        pass


# ----- class splits and rotations ---------------------------------------------------------------------


def alphabet_of(class_name: str) -> str:
    """ "Greek/character03@90" -> "Greek"."""
    return class_name.split("/", 1)[0]


def _character_of(class_name: str) -> str:
    return class_name.split(ROTATION_SEPARATOR, 1)[0]


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions``, every positive fraction getting at least one."""
    raw = [n * f for f in fractions]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            j = max(range(len(counts)), key=lambda j: counts[j])
            if counts[j] <= 1:
                raise ValueError(f"cannot split {n} groups into {len(fractions)} non-empty parts {list(fractions)}")
            counts[j] -= 1
            counts[i] += 1
    return counts


def split_classes(
    class_names: Sequence[str],
    mode: str = "alphabet",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    *,
    alphabets: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Class indices of the (train, val, test) splits, as sorted lists.

    ``mode="alphabet"`` keeps each alphabet in one split (the harder, standard protocol: new alphabets at test
    time); ``"character"`` splits characters, so an alphabet can appear in several splits. Rotated copies of
    a character (``augment_rotations``) always stay with it. Groups are shuffled with ``seed`` and shared out
    by ``fractions`` (train, val, test; a zero gives an empty split). Alternatively ``alphabets`` names the
    alphabets of each split explicitly (three lists; alphabets named nowhere are left out); ``mode``,
    ``fractions`` and ``seed`` are then ignored.
    """
    names = list(class_names)
    if alphabets is not None:
        if len(alphabets) != 3:
            raise ValueError(f"alphabets must be three lists (train, val, test), got {len(alphabets)}")
        known = {alphabet_of(n) for n in names}
        where: dict[str, int] = {}
        for split, group in enumerate(alphabets):
            if isinstance(group, str):
                raise ValueError(f"alphabets must hold lists of names, got the string {group!r}")
            for a in group:
                if a not in known:
                    raise ValueError(f"unknown alphabet {a!r}; known: {sorted(known)}")
                if a in where and where[a] != split:
                    raise ValueError(f"alphabet {a!r} is in two splits")
                where[a] = split
        out: tuple[list[int], list[int], list[int]] = ([], [], [])
        for i, n in enumerate(names):
            if alphabet_of(n) in where:
                out[where[alphabet_of(n)]].append(i)
        return out
    if mode not in ("alphabet", "character"):
        raise ValueError(f"mode must be 'alphabet' or 'character', got {mode!r}")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(not np.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {fr}")
    group_of = alphabet_of if mode == "alphabet" else _character_of
    groups = sorted({group_of(n) for n in names})
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(groups), generator=g).tolist()
    counts = _counts(len(groups), fr)
    split_of: dict[str, int] = {}
    start = 0
    for split, c in enumerate(counts):
        for j in perm[start : start + c]:
            split_of[groups[j]] = split
        start += c
    out = ([], [], [])
    for i, n in enumerate(names):
        out[split_of[group_of(n)]].append(i)
    return out


def augment_rotations(
    images: Tensor, labels: Tensor, class_names: Sequence[str], angles: Sequence[int] = (0, 90, 180, 270)
) -> OmniglotData:
    """Every image rotated by each of ``angles`` (multiples of 90, counter-clockwise), each rotation a new class.

    Class ``c`` rotated by ``angles[r]`` becomes class ``c * len(angles) + r``, named ``"<name>@<angle>"`` (the
    0-degree copy keeps the plain name). Images are ordered rotation-major: the block for ``angles[r]`` is
    ``torch.rot90(images, angles[r] // 90, dims=(-2, -1))``. Split the classes (``split_classes``, which keeps
    rotations of a character together) or augment only the training split, so no test character leaks.
    """
    angles = [int(a) for a in angles]
    if not angles or any(a % 90 for a in angles) or len({a % 360 for a in angles}) != len(angles):
        raise ValueError(f"angles must be distinct multiples of 90, got {angles}")
    r = len(angles)
    imgs = torch.cat([torch.rot90(images, (a // 90) % 4, dims=(-2, -1)) for a in angles])
    labs = torch.cat([labels * r + i for i in range(r)])
    names = [n if a % 360 == 0 else f"{n}{ROTATION_SEPARATOR}{a}" for n in class_names for a in angles]
    return OmniglotData(imgs, labs, names)


# ----- Lake's 20 one-shot runs ------------------------------------------------------------------------


@dataclass
class LakeRun:
    """One 20-way one-shot run: ``train_images`` [20, 1, s, s] (one per class), ``test_images`` [20, 1, s, s],
    ``test_labels`` [20] (the index into ``train_images`` of each test item's class)."""

    name: str
    train_images: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_lake_runs(
    root: str | os.PathLike, size: int = 28, *, dtype: torch.dtype = torch.float32, resample: str = "lanczos"
) -> list[LakeRun]:
    """The 20 runs of ``all_runs.zip`` (Lake et al. 2015), from ``root`` holding ``all_runs.zip`` or its
    extracted ``all_runs/`` folder (or the ``runNN`` folders themselves), in run order.

    ``runNN/class_labels.txt`` has one line per test item: ``runNN/test/itemMM.png runNN/training/classKK.png``.
    Images are preprocessed as ``load_omniglot``'s (inverted, resized, [0, 1] for a floating ``dtype``).
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    root = Path(root).expanduser()
    if root.is_dir() and (root / "all_runs").is_dir():
        base: Path | zipfile.ZipFile = root / "all_runs"
    elif root.is_dir() and (root / "all_runs.zip").is_file():
        base = zipfile.ZipFile(root / "all_runs.zip")
    elif root.is_file() and root.suffix.lower() == ".zip":
        base = zipfile.ZipFile(root)
    elif root.is_dir():
        base = root
    else:
        raise FileNotFoundError(f"no all_runs.zip or all_runs/ under {root}")

    if isinstance(base, zipfile.ZipFile):
        with base:
            files = {n: base.read(n) for n in base.namelist() if not n.endswith("/")}
    else:
        files = {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    # Index by the last three path parts ("run01/test/item01.png"), whatever folder the runs sit in.
    by_tail = {"/".join(PurePosixPath(n).parts[-3:]): data for n, data in files.items()}
    label_files = sorted(n for n in files if PurePosixPath(n).name == "class_labels.txt")
    if not label_files:
        raise FileNotFoundError(f"no runNN/class_labels.txt under {root}")

    def tensor(arrays: list[np.ndarray]) -> Tensor:
        t = torch.from_numpy(np.stack(arrays))[:, None]
        return t if dtype == torch.uint8 else t.to(dtype) / 255

    runs = []
    for lf in label_files:
        run = PurePosixPath(lf).parent.name
        pairs = []
        for line in files[lf].decode().splitlines():
            if line.strip():
                test, train = line.split()
                pairs.append(("/".join(PurePosixPath(test).parts[-3:]), "/".join(PurePosixPath(train).parts[-3:])))
        pairs.sort()
        train_names = sorted(n for n in by_tail if n.startswith(f"{run}/training/") and n.endswith(".png"))
        index = {n: i for i, n in enumerate(train_names)}
        for test, train in pairs:
            if train not in index or test not in by_tail:
                raise ValueError(f"{lf}: {test} -> {train} names a file that is not in the run")
        runs.append(
            LakeRun(
                name=run,
                train_images=tensor([_decode(by_tail[n], size, resample) for n in train_names]),
                test_images=tensor([_decode(by_tail[t], size, resample) for t, _ in pairs]),
                test_labels=torch.tensor([index[c] for _, c in pairs], dtype=torch.int64),
            )
        )
    return runs


def lake_task_batch(runs: Sequence[LakeRun], dtype: torch.dtype | None = None) -> TaskBatch:
    """The runs as one TaskBatch: support = the 20 training images labelled 0..19, query = the 20 test items."""
    dtype = dtype or torch.get_default_dtype()

    def f(t: Tensor) -> Tensor:
        return t.to(dtype) / 255 if t.dtype == torch.uint8 else t.to(dtype)

    sx = torch.stack([f(r.train_images) for r in runs])
    sy = torch.stack([torch.arange(r.train_images.shape[0]) for r in runs])
    qx = torch.stack([f(r.test_images) for r in runs])
    qy = torch.stack([r.test_labels for r in runs])
    return TaskBatch(sx, sy, qx, qy)


# ----- the registered task family -----------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


@dataclass
class OmniglotConfig:
    """``[task]`` options of Omniglot N-way classification (``name = "omniglot"``); shots and queries are per
    class. ``split``: how classes are held out (by ``character``, by ``alphabet``, or ``none``: every split uses
    every class, e.g. to meta-train on the whole background set for Lake's runs)."""

    shots: int = 1
    queries: int = 5
    ways: int = 5
    data: str = "../shared/data/omniglot"
    split: str = "character"
    rotations: bool = True
    image_size: int = 28


@functools.lru_cache(maxsize=4)
def _omniglot(root: str, size: int, rotations: bool) -> OmniglotData:
    from metagrad.errors import ConfigError

    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(
            f"task.data = {root!r} does not exist; point it at an Omniglot folder or its zip files "
            "(e.g. task.data=../shared/data/omniglot)"
        )
    from metagrad.errors import DataError
    from metagrad.tasks.imagelayouts import detect_layout

    try:  # another layout is refused, not read as alphabets (a train/ folder would become an "alphabet")
        layout = detect_layout(path.resolve())
    except DataError:
        layout = "omniglot"  # let the reader say what it misses
    if layout != "omniglot":
        raise DataError(
            f"task.data = {root!r} holds a {layout} image data set, not Omniglot (images_*.zip or "
            '<Alphabet>/<character>/*.png): use task.name = "images", which reads it as it is'
        )
    try:
        data = load_omniglot(path, size=size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"task.data = {root!r} could not be read as Omniglot: {e}") from None
    return augment_rotations(*data) if rotations else data


@register_task("omniglot", config=OmniglotConfig)
class Omniglot:
    """N-way K-shot episodes of Omniglot characters (Lake et al. 2015), one class split at a time.

    The class split is drawn from a fixed seed (0), independent of the training seed, so every run holds out the
    same classes; evaluation uses the ``test`` split."""

    loss = "cross_entropy"

    @staticmethod
    def from_config(options: OmniglotConfig, split: str = "test") -> EpisodeSampler:
        from metagrad.errors import ConfigError

        t = options
        data = _omniglot(t.data, t.image_size, t.rotations)
        if t.split == "none":
            classes = list(range(len(data.class_names)))
        else:
            parts = split_classes(data.class_names, t.split, (0.7, 0.1, 0.2), seed=0)
            classes = dict(zip(SPLITS, parts, strict=True))[split]
        if t.ways > len(classes):
            raise ConfigError(f"task.ways = {t.ways} exceeds the {len(classes)} classes of the {split} split")
        sampler = EpisodeSampler(data.images, data.labels, t.ways, classes, name="omniglot")
        if t.shots + t.queries > sampler.min_images_per_class:
            raise ConfigError(
                f"task.shots + task.queries = {t.shots + t.queries} exceeds the {sampler.min_images_per_class} "
                "images per Omniglot class"
            )
        return sampler

    @staticmethod
    def spec(options: OmniglotConfig) -> tuple[tuple[int, ...], int]:
        return (1, options.image_size, options.image_size), options.ways
