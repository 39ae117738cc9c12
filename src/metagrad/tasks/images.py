"""Few-shot image classification on the data sets people have on disk: the ``images`` task family.

``load_images(root)`` reads any layout of :mod:`metagrad.tasks.imagelayouts` (image folders, the user's
train/val/test folders, Ravi & Larochelle's miniImageNet CSVs, learn2learn/MetaOptNet pickles through a restricted
unpickler, Omniglot), resizes every image to ``image_size`` and keeps its channels (grey stays one channel, colour
three; a grey image among colour ones is replicated), decoding in a process pool with a progress bar. The decoded
uint8 array is cached, memory-mapped, under ``METAGRAD_CACHE`` (:mod:`metagrad.tasks.imagecache`), keyed by the
files' names, sizes and modification times.

The registered family ``images`` samples N-way K-shot episodes from one split by vectorised indexing into that
array, normalised per channel with statistics of the training classes (written into ``task.mean``/``task.std``, so
the run's config stores them and evaluation reuses them), with optional training-only augmentation.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import warnings
import zipfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metagrad.errors import ConfigError, DataError
from metagrad.registry import register_task
from metagrad.task_threads import usable_cores
from metagrad.tasks.episodes import EpisodeSampler
from metagrad.tasks.imagecache import CacheWriter, cache_key, default_cache_dir, read_cache
from metagrad.tasks.imagelayouts import LAYOUTS, ImageClass, Scan, scan
from metagrad.tasks.omniglot import split_classes
from metagrad.tasks.safepickle import load_safe_pickle

__all__ = [
    "ImageSet",
    "ImagesConfig",
    "ImageEpisodes",
    "load_images",
    "image_splits",
    "channel_statistics",
    "describe",
    "RESAMPLE",
]

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_CHUNK = 128  # images per task sent to a decoding process
_INLINE = 512  # fewer images than this are decoded in this process: a pool costs more than it saves


@dataclass
class ImageSet:
    """A decoded data set: ``images`` [N, C, S, S] uint8 (memory-mapped from the cache when there is one),
    ``labels`` [N] int64 class ids (class-major), ``class_names``, ``class_splits`` (each class's split, or
    ``None`` for layouts without one), the ``layout`` and ``root`` read, a ``summary`` of the source images
    (sizes, channels) and the cache file (``None`` when nothing was cached)."""

    images: Tensor
    labels: Tensor
    class_names: list[str]
    class_splits: list[str | None]
    layout: str
    root: Path
    summary: dict[str, Any] = field(default_factory=dict)
    cache_path: Path | None = None

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def counts(self) -> Tensor:
        """Images per class."""
        return torch.bincount(self.labels, minlength=len(self.class_names))


# ----- decoding (runs in worker processes: numpy and Pillow only) ---------------------------------------------
_ZIPS: dict[str, zipfile.ZipFile] = {}


def _fresh_worker() -> None:
    """Initializer of a forked decoding process: forget the parent's zip handles (a handle's file offset is shared
    with the parent and every sibling, so reading through it would race); the worker opens its own."""
    _ZIPS.clear()


def _open(ref: tuple[str | None, str]) -> Any:
    container, name = ref
    if container is None:
        return name
    z = _ZIPS.get(container)
    if z is None:
        z = _ZIPS[container] = zipfile.ZipFile(container)
    return io.BytesIO(z.read(name))


def _convert(im: Image.Image, size: int, channels: int, resample: str) -> tuple[np.ndarray, bool]:
    """One image -> uint8 [c, size, size] and whether it was grey. Converted to 8 bits *before* resizing (Pillow
    resizes 1-bit images with nearest neighbour whatever filter is asked for). ``channels`` 0 keeps grey as one
    channel and colour as three."""
    grey = im.mode in _GREY_MODES
    target = "L" if channels == 1 or (channels == 0 and grey) else "RGB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's note on palette transparency
        im = im.convert(target)
    if im.size != (size, size):
        im = im.resize((size, size), resample=RESAMPLE[resample])
    a = np.asarray(im, dtype=np.uint8)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)), grey


def _decode_chunk(
    refs: Sequence[tuple[str | None, str]], size: int, channels: int, resample: str
) -> tuple[np.ndarray, list[bool], list[str], str | None]:
    """Decode ``refs`` into [n, 3 or channels, size, size]: (array, grey flags, source sizes, first error)."""
    c = channels or 3
    out = np.empty((len(refs), c, size, size), dtype=np.uint8)
    greys, sizes = [], []
    for i, ref in enumerate(refs):
        try:
            with Image.open(_open(ref)) as im:
                sizes.append(f"{im.size[0]}x{im.size[1]}")
                a, grey = _convert(im, size, channels, resample)
        except Exception as e:  # noqa: BLE001 - Pillow reports a corrupt file in many ways
            where = ref[1] if ref[0] is None else f"{ref[0]}:{ref[1]}"
            return out[:i], greys, sizes, f"cannot decode image {where} ({type(e).__name__}: {e}); remove or replace it"
        out[i] = a  # a grey image among colour ones is broadcast to three equal channels
        greys.append(grey)
    return out, greys, sizes, None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, file=sys.stderr)


def _decode_files(
    refs: list[tuple[str | None, str]], array: np.ndarray, size: int, channels: int, resample: str, workers: int,
    progress: bool,
) -> tuple[list[bool], Counter]:  # fmt: skip
    """Decode every file into ``array`` (in a process pool for large sets); the grey flags and a size histogram."""
    chunks = [refs[i : i + _CHUNK] for i in range(0, len(refs), _CHUNK)]
    greys: list[bool] = []
    sizes: Counter = Counter()
    call = functools.partial(_decode_chunk, size=size, channels=channels, resample=resample)
    pool = None
    if workers > 1 and len(refs) >= _INLINE:
        import multiprocessing as mp

        # fork: the workers need no import and inherit nothing they use but numpy and Pillow (no torch calls);
        # _fresh_worker drops the zip handles they would otherwise inherit.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method), initializer=_fresh_worker)
    try:
        results = pool.map(call, chunks) if pool is not None else map(call, chunks)
        with _progress(len(refs), "decoding images", progress) as bar:
            pos = 0
            for out, g, s, error in results:
                if error is not None:
                    raise DataError(error)
                array[pos : pos + len(out)] = out
                pos += len(out)
                greys.extend(g)
                sizes.update(s)
                bar.update(len(out))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return greys, sizes


# ----- pickles ------------------------------------------------------------------------------------------------


def _channels_last(images: np.ndarray, path: Path) -> np.ndarray:
    """Pickled images as [N, H, W] (grey) or [N, H, W, C]: channels-last as they are (last dim 1, 3 or 4),
    channels-first [N, C, H, W] (C 1, 3 or 4, width over 4) transposed; anything else a :class:`DataError`."""
    if images.dtype == np.uint8 and images.ndim == 3:
        return images
    if images.dtype == np.uint8 and images.ndim == 4:
        if images.shape[-1] in (1, 3, 4):
            return images
        if images.shape[1] in (1, 3, 4) and images.shape[-1] > 4:
            return images.transpose(0, 2, 3, 1)
    raise DataError(
        f"{path}: images of shape {tuple(images.shape)} ({images.dtype}) are in no known layout; expected uint8 "
        "[N, H, W] (grey), [N, H, W, C] or [N, C, H, W] with C 1, 3 or 4; re-save the arrays in one of these"
    )


def _pickle_classes(path: Path, split: str) -> list[tuple[str, np.ndarray]]:
    """(class name, images [n, H, W(, C)] uint8) per class of one learn2learn or MetaOptNet pickle."""
    data = load_safe_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict of arrays, got a {type(data).__name__}")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    if "image_data" in keys and "class_dict" in keys:  # learn2learn's mini-imagenet-cache-*.pkl
        images, groups = np.asarray(keys["image_data"]), keys["class_dict"]
        if not isinstance(groups, dict):
            raise DataError(f"{path}: class_dict is a {type(groups).__name__}, not a dict")
        rows = {
            str(k.decode() if isinstance(k, bytes) else k): np.asarray(v, dtype=np.int64) for k, v in groups.items()
        }
    elif "data" in keys and "labels" in keys:  # MetaOptNet's CIFAR-FS, FC100 and miniImageNet pickles
        images, labels = np.asarray(keys["data"]), np.asarray(keys["labels"]).reshape(-1)
        if labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: labels must be {images.shape[0]} integers, one per image")
        names = {}
        for name, label in (keys.get("catname2label") or {}).items():
            names[int(label)] = name.decode() if isinstance(name, bytes) else str(name)
        rows = {names.get(int(lab), str(int(lab))): np.flatnonzero(labels == lab) for lab in np.unique(labels)}
    else:
        raise DataError(
            f"{path}: unknown pickle contents (keys {sorted(map(str, keys))}); expected image_data + class_dict "
            "(learn2learn) or data + labels (MetaOptNet)"
        )
    images = _channels_last(images, path)
    out = []
    for name in rows if "labels" in keys else sorted(rows):  # MetaOptNet's classes in label order
        r = rows[name]
        if r.size == 0:
            raise DataError(f"{path}: class {name!r} of the {split} split has no images")
        if r.min() < 0 or r.max() >= images.shape[0]:
            raise DataError(f"{path}: class {name!r} names image rows outside 0..{images.shape[0] - 1}")
        out.append((name, images[r]))
    return out


def _decode_arrays(
    groups: list[tuple[str, str, np.ndarray]], size: int, channels: int, resample: str, directory: Any, key: str,
    progress: bool,
) -> tuple[CacheWriter, list[bool], Counter]:  # fmt: skip
    n = sum(len(a) for _, _, a in groups)
    colour = any(a.ndim == 4 and a.shape[-1] > 1 for _, _, a in groups)
    c = channels or (3 if colour else 1)
    writer = CacheWriter(directory, key, (n, c, size, size))
    try:
        greys, sizes = _convert_arrays(groups, writer.array, size, channels, resample, progress)
    except BaseException:
        writer.discard()  # a failed or interrupted conversion leaves no cache behind
        raise
    return writer, greys, sizes


def _convert_arrays(
    groups: list[tuple[str, str, np.ndarray]], array: np.ndarray, size: int, channels: int, resample: str,
    progress: bool,
) -> tuple[list[bool], Counter]:  # fmt: skip
    """Resize every group's images into ``array``: the grey flags and a size histogram."""
    c = array.shape[1]
    greys: list[bool] = []
    sizes: Counter = Counter()
    pos = 0
    with _progress(len(array), "converting arrays", progress) as bar:
        for _, _, a in groups:
            a = a if a.ndim == 4 else a[..., None]
            grey = a.shape[-1] == 1
            sizes[f"{a.shape[2]}x{a.shape[1]}"] += len(a)
            greys.extend([grey] * len(a))
            if a.shape[1:3] == (size, size) and (a.shape[-1] == c or grey):
                array[pos : pos + len(a)] = a.transpose(0, 3, 1, 2)  # grey broadcasts to c channels
            else:
                for i, img in enumerate(a):
                    mode_img = Image.fromarray(img[..., 0] if grey else img[..., :3])
                    array[pos + i] = _convert(mode_img, size, channels, resample)[0]
            pos += len(a)
            bar.update(len(a))
    return greys, sizes


# ----- loading ------------------------------------------------------------------------------------------------


def load_images(
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    image_size: int = 84,
    channels: int = 0,
    resample: str = "bilinear",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 0,
    progress: bool = False,
) -> ImageSet:
    """Every image under ``root`` (see the module docstring), resized to ``image_size`` x ``image_size``.

    ``channels`` 0 keeps the data's (1 if every image is grey, else 3), 1 or 3 converts. ``workers`` decoding
    processes (0: one per CPU core this process may use). With ``cache`` the result is stored in ``cache_dir`` (default
    ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``) and memory-mapped from there on later loads. Bad input raises a
    :class:`~metagrad.errors.DataError` naming the file."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if int(image_size) < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    if channels not in (0, 1, 3):
        raise ConfigError(f"channels must be 0 (as the data), 1 or 3, got {channels}")
    if resample not in RESAMPLE:
        raise ConfigError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    size, workers = int(image_size), int(workers) or usable_cores()
    found = scan(root, layout)
    options = {"size": size, "channels": channels, "resample": resample, "layout": found.layout}
    key = cache_key([str(found.root), found.fingerprint], options)
    directory = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cache else None
    if directory is not None:
        hit = read_cache(directory, key)
        if hit is not None:
            images, record = hit
            return _image_set(images, record, found, directory / f"images-{key}.npy")

    if found.layout == "pickle":
        groups = [(name, split, a) for split, p in found.pickles.items() for name, a in _pickle_classes(p, split)]
        names, splits = [g[0] for g in groups], [g[1] for g in groups]
        counts = [len(g[2]) for g in groups]
        writer, greys, sizes = _decode_arrays(groups, size, channels, resample, directory, key, progress)
    else:
        classes: list[ImageClass] = found.classes
        names, splits = [c.name for c in classes], [c.split for c in classes]
        counts = [len(c.files) for c in classes]
        refs = [f for c in classes for f in c.files]
        writer = CacheWriter(directory, key, (len(refs), channels or 3, size, size))
        try:
            greys, sizes = _decode_files(refs, writer.array, size, channels, resample, workers, progress)
        except BaseException:
            writer.discard()  # a failed or interrupted decode leaves no cache behind
            raise
    grey = sum(greys)
    record = {
        "layout": found.layout,
        "class_names": names,
        "class_splits": splits,
        "counts": counts,
        "summary": {"sizes": dict(sizes.most_common()), "grey_images": grey, "colour_images": len(greys) - grey},
    }
    keep = 1 if channels == 0 and grey == len(greys) else None  # every image grey: one channel, as the data
    images, path = writer.commit(record, keep)
    record["shape"] = list(images.shape)
    return _image_set(images, record, found, path)


def _image_set(images: np.ndarray, record: dict[str, Any], found: Scan, path: Path | None) -> ImageSet:
    counts = torch.as_tensor(record["counts"], dtype=torch.int64)
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return ImageSet(
        torch.from_numpy(images), labels, list(record["class_names"]), list(record["class_splits"]),
        record["layout"], found.root, dict(record["summary"]), path,
    )  # fmt: skip


def image_splits(data: ImageSet, ratios: Sequence[float] | None = None, seed: int = 0) -> dict[str, list[int]]:
    """Class ids of each split: the data set's own split when its layout has one, else a seeded split of the
    classes by ``ratios`` (train, val, test; default 0.7/0.1/0.2)."""
    if data.class_splits and data.class_splits[0] is not None:
        if ratios:
            raise ConfigError(
                f"task.split_ratios = {list(ratios)}: the {data.layout} layout of {data.root} brings its own "
                "train/val/test split, which metagrad keeps; remove task.split_ratios"
            )
        return {s: [i for i, c in enumerate(data.class_splits) if c == s] for s in SPLITS}
    ratios = list(ratios) if ratios else list(DEFAULT_SPLIT)
    try:
        parts = split_classes(data.class_names, "character", ratios, seed=seed)
    except ValueError as e:
        raise ConfigError(f"task.split_ratios = {ratios}: {e}") from None
    return dict(zip(SPLITS, parts, strict=True))


def channel_statistics(images: Tensor, rows: Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the uint8 ``images[rows]`` scaled to [0, 1]: exact integer sums
    of the values and of their squares, in chunks so that a memory-mapped set is read once and never whole into
    memory, then one correctly rounded division each."""
    c = images.shape[1]
    total = np.zeros(c, dtype=np.uint64)
    squares = np.zeros(c, dtype=np.uint64)
    count = 0
    rows = torch.sort(rows).values  # sequential reads of the memory map
    for i in range(0, rows.numel(), chunk):
        x = images[rows[i : i + chunk]].numpy()
        total += np.add.reduce(x, axis=(0, 2, 3), dtype=np.uint64)
        x = x.astype(np.uint16)
        x *= x  # 255 ** 2 fits in 16 bits
        squares += np.add.reduce(x, axis=(0, 2, 3), dtype=np.uint64)
        count += x.size // c
    if count == 0:
        raise DataError("no training images to compute the normalisation from")
    scale = count * 255
    mean = [int(s) / scale for s in total]
    var = [(count * int(q) - int(s) ** 2) / scale**2 for s, q in zip(total, squares, strict=True)]  # exact numerator
    return mean, [max(v**0.5, 1e-3) for v in var]  # a constant channel must not divide by zero


def describe(data: ImageSet, ratios: Sequence[float] | None = None) -> str:
    """What ``metagrad data`` prints: layout, classes and images per split, source sizes and channels."""
    splits = image_splits(data, ratios)
    counts = data.counts
    own = "the data set's own" if data.class_splits and data.class_splits[0] is not None else "metagrad's seeded"
    lines = [f"{data.root}: layout {data.layout}, {len(data.class_names)} classes, {len(data.labels)} images"]
    lines.append(f"splits ({own}):")
    for s in SPLITS:
        ids = splits[s]
        if ids:
            cs = counts[ids]
            per = f"{int(cs.min())}" if int(cs.min()) == int(cs.max()) else f"{int(cs.min())}-{int(cs.max())}"
            lines.append(f"  {s:<5} {len(ids):>6} classes {int(cs.sum()):>8} images ({per} per class)")
        else:
            lines.append(f"  {s:<5} {0:>6} classes")
    sizes = data.summary.get("sizes", {})
    shown = ", ".join(f"{k} ({v})" for k, v in list(sizes.items())[:5]) + (" ..." if len(sizes) > 5 else "")
    lines.append(f"source sizes: {shown}")
    grey, colour = data.summary.get("grey_images", 0), data.summary.get("colour_images", 0)
    lines.append(f"source channels: {colour} colour, {grey} grey")
    lines.append(f"decoded: {data.channels} x {data.images.shape[2]} x {data.images.shape[3]} per image (uint8)")
    lines.append(f"cache: {data.cache_path or 'none (not written)'}")
    return "\n".join(lines)


# ----- the registered task family -------------------------------------------------------------------------


@dataclass
class ImagesConfig:
    """``[task]`` options of N-way K-shot image classification (``name = "images"``); shots and queries per class.

    ``data``: the data set's folder. ``layout``: auto, imagefolder, split_folders, csv, pickle or omniglot.
    ``split_ratios``: train/val/test class ratios for layouts without a split of their own (default 0.7/0.1/0.2,
    seeded).
    ``channels``: 0 keeps the data's, 1 or 3 converts. ``mean``/``std``: per-channel normalisation, both set or
    both left empty: then they are computed on the training classes and written here (so the run's config records
    them).
    ``augment``: random crop with ``crop_padding`` pixels of zero padding and horizontal flips, training split only.
    ``workers``: decoding processes (0: one per CPU core this process may use)."""

    shots: int = 1
    queries: int = 15
    ways: int = 5
    data: str = ""
    layout: str = "auto"
    split_ratios: list[float] = field(default_factory=list)
    image_size: int = 84
    channels: int = 0
    resample: str = "bilinear"
    normalize: bool = True
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    augment: bool = False
    crop_padding: int = 8
    workers: int = 0


def _load(root: str, t: ImagesConfig) -> ImageSet:
    # No in-process cache: listing the files is what notices a changed folder, and a cache hit is a memory map.
    return load_images(
        root, layout=t.layout, image_size=t.image_size, channels=t.channels, resample=t.resample, workers=t.workers,
        progress=sys.stderr.isatty(),
    )  # fmt: skip


_STATISTICS: dict[tuple, tuple[list[float], list[float]]] = {}


def _statistics(data: ImageSet, train: list[int]) -> tuple[list[float], list[float]]:
    """Normalisation of the training classes, computed once per cached data set and split."""
    key = (str(data.cache_path), tuple(data.images.shape), tuple(train)) if data.cache_path else None
    if key is not None and key in _STATISTICS:
        return _STATISTICS[key]
    rows = torch.nonzero(torch.isin(data.labels, torch.as_tensor(train, dtype=torch.int64))).squeeze(1)
    result = channel_statistics(data.images, rows)
    if key is not None:
        _STATISTICS[key] = result
    return result


def _check_options(t: ImagesConfig) -> None:
    if not t.data:
        raise ConfigError("task.data is not set: point it at the folder holding your image data set")
    if t.layout not in LAYOUTS:
        raise ConfigError(f"task.layout = {t.layout!r} is not one of {', '.join(LAYOUTS)}")
    if t.channels not in (0, 1, 3):
        raise ConfigError(f"task.channels = {t.channels}: use 0 (as the data), 1 or 3")
    if t.image_size < 1 or t.crop_padding < 0 or t.workers < 0:
        raise ConfigError("task.image_size must be positive, task.crop_padding and task.workers non-negative")
    if t.resample not in RESAMPLE:
        raise ConfigError(f"task.resample = {t.resample!r} is not one of {', '.join(RESAMPLE)}")
    if bool(t.mean) != bool(t.std):
        raise ConfigError(
            f"task.mean and task.std must be set together, got mean {t.mean} and std {t.std}; set both (one value "
            "per channel) or leave both empty to compute them on the training classes"
        )
    r = t.split_ratios
    if r and (len(r) != 3 or min(r) < 0 or abs(sum(r) - 1) > 1e-6):
        raise ConfigError(f"task.split_ratios = {r} must be three non-negative ratios (train, val, test) summing to 1")
    for name in ("shots", "queries", "ways"):
        if getattr(t, name) < 1:
            raise ConfigError(f"task.{name} must be positive, got {getattr(t, name)}")


@register_task("images", config=ImagesConfig)
class ImageEpisodes:
    """N-way K-shot episodes from an image data set on disk (see the module docstring); ``from_config`` returns
    an :class:`~metagrad.tasks.episodes.EpisodeSampler` over one split."""

    loss = "cross_entropy"

    @staticmethod
    def from_config(options: ImagesConfig, split: str = "test") -> EpisodeSampler:
        t = options
        _check_options(t)
        root = Path(t.data).expanduser()
        if not root.exists():
            raise ConfigError(f"task.data = {t.data!r} does not exist; point it at the folder holding the data set")
        data = _load(str(root), t)
        splits = image_splits(data, t.split_ratios)
        classes = splits[split]
        if t.ways > len(classes):
            raise ConfigError(
                f"task.ways = {t.ways} exceeds the {len(classes)} classes of the {split} split of {t.data}; "
                "lower task.ways or use more classes"
            )
        counts = data.counts
        need = t.shots + t.queries
        small = [c for c in classes if int(counts[c]) < need]
        if small:
            c = small[0]
            raise ConfigError(
                f"class {data.class_names[c]!r} ({split} split) has {int(counts[c])} images; task.shots + task.queries "
                f"= {need} needs that many per class ({len(small)} class(es) too small)"
            )
        mean, std = t.mean, t.std
        if t.normalize and not mean:
            if not splits["train"]:
                raise ConfigError(f"the train split of {t.data} has no classes to compute the normalisation from")
            mean, std = _statistics(data, splits["train"])
            t.mean, t.std = list(mean), list(std)  # recorded in the run's config: evaluation uses the same
        if t.normalize and (len(mean) != data.channels or len(std) != data.channels or min(std) <= 0):
            raise ConfigError(
                f"task.mean / task.std must hold {data.channels} values (std positive) for this data, got {mean} / "
                f"{std}; leave them empty to compute them on the training classes"
            )
        augment = t.crop_padding if (t.augment and split == "train") else None
        return EpisodeSampler(
            data.images, data.labels, t.ways, classes, name="images",
            mean=mean if t.normalize else None, std=std if t.normalize else None, augment=augment,
        )  # fmt: skip
