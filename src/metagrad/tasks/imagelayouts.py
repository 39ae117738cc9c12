"""Where the images of a few-shot data set are, in each layout people distribute them in.

:func:`scan` recognises the layout of a folder (or takes the one named) and lists its classes, with the split each
class belongs to when the layout brings one, and the files behind each class; no image is opened here.

* ``imagefolder``: ``root/<class>/*.{png,jpg,jpeg}`` (no split: metagrad's seeded one is used).
* ``split_folders``: ``root/{train,val,test}/<class>/*`` (``valid``/``validation`` also name the val split).
* ``csv``: Ravi & Larochelle's miniImageNet, ``root/images/*.jpg`` with ``root/{train,val,test}.csv`` rows
  ``filename,label``.
* ``pickle``: learn2learn's ``mini-imagenet-cache-{split}.pkl`` or MetaOptNet's ``*_{split}.pickle`` (CIFAR-FS,
  FC100, miniImageNet). Classes are only known once the files are unpickled (see :mod:`metagrad.tasks.images`).
* ``omniglot``: ``images_*.zip`` files or folders holding ``<Alphabet>/<character>/*.png``, or those two levels
  directly under ``root``; classes are ``Alphabet/character``, as :func:`metagrad.tasks.omniglot.load_omniglot`
  names them.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from metagrad.errors import DataError
from metagrad.tasks.omniglot import _find_sources

__all__ = ["LAYOUTS", "IMAGE_EXTENSIONS", "SPLIT_NAMES", "ImageClass", "Scan", "scan", "detect_layout"]

LAYOUTS = ("auto", "imagefolder", "split_folders", "csv", "pickle", "omniglot")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_LOOKED_FOR = (
    "<class>/*.png|jpg|jpeg (imagefolder), {train,val,test}/<class>/* (split_folders), images/*.jpg with "
    "{train,val,test}.csv (csv), mini-imagenet-cache-{split}.pkl or *_{split}.pickle (pickle), images_*.zip or "
    "<Alphabet>/<character>/*.png (omniglot)"
)


@dataclass
class ImageClass:
    """One class: its name, its split (``None`` if the layout has none) and its image files, each a
    ``(zip file or None, path)`` pair, sorted by file name."""

    name: str
    split: str | None
    files: list[tuple[str | None, str]]


@dataclass
class Scan:
    """A recognised data set: its layout, its classes (``pickles`` instead for the pickle layout) and the
    fingerprint (names, sizes, modification times) that keys its cache."""

    layout: str
    root: Path
    classes: list[ImageClass] = field(default_factory=list)
    pickles: dict[str, Path] = field(default_factory=dict)
    fingerprint: list = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(c.files) for c in self.classes)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _subdirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))


def _images_in(p: Path) -> list[Path]:
    return sorted((c for c in p.iterdir() if c.is_file() and _is_image(c)), key=lambda c: c.name)


def _split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_NAMES.items():
        for n in names:
            if (root / n).is_dir():
                found[split] = root / n
                break
    return found


def _pickle_files(root: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in (".pkl", ".pickle") or not p.is_file():
            continue
        stem = p.stem.lower()
        if "train_phase_val" in stem or "train_phase_test" in stem:  # MetaOptNet's pre-training splits
            continue
        for split, names in SPLIT_NAMES.items():
            if any(stem.endswith(f"{sep}{n}") for n in names for sep in "-_"):
                found.setdefault(split, []).append(p)
    for split, paths in found.items():
        if len(paths) > 1:
            raise DataError(
                f"{root}: several pickles for the {split} split ({', '.join(p.name for p in paths)}); "
                "keep one per split"
            )
    return {s: ps[0] for s, ps in found.items()}


def detect_layout(root: Path) -> str:
    """The layout of ``root`` (see the module docstring); a :class:`DataError` listing what was looked for."""
    if not root.is_dir():
        if not root.exists():
            raise DataError(f"{root} does not exist; point task.data at the folder holding the data set")
        if root.suffix.lower() == ".zip":
            return "omniglot"
        raise DataError(f"{root} is a file; point task.data at the folder holding the data set")
    if (root / "images").is_dir() and (root / "train.csv").is_file():
        return "csv"
    if "train" in _split_dirs(root):
        return "split_folders"
    if "train" in _pickle_files(root):
        return "pickle"
    if any(p.name.startswith("images_") and (p.is_dir() or p.suffix.lower() == ".zip") for p in root.iterdir()):
        return "omniglot"
    subdirs = _subdirs(root)
    if any(_images_in(d) for d in subdirs):
        return "imagefolder"
    if any(_images_in(dd) for d in subdirs for dd in _subdirs(d)):
        return "omniglot"
    raise DataError(f"no image data set recognised under {root}: looked for {_LOOKED_FOR}")


def _stat(p: Path, root: Path) -> list:
    st = p.stat()
    return [p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns]


def _folder_classes(base: Path, split: str | None) -> list[ImageClass]:
    classes = []
    for d in _subdirs(base):
        files = _images_in(d)
        if not files:
            raise DataError(f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        classes.append(ImageClass(d.name, split, [(None, str(f)) for f in files]))
    if not classes:
        raise DataError(f"{base} holds no class folders (<class>/*.png|jpg|jpeg)")
    return classes


def _check_disjoint(classes: list[ImageClass], root: Path) -> None:
    """A :class:`DataError` when a class name, or an image file, is in two splits: test episodes would then be
    drawn from classes (or images) trained on."""
    split_of: dict[str, str | None] = {}
    owner: dict[str, ImageClass] = {}
    for c in classes:
        if split_of.setdefault(c.name, c.split) != c.split:
            raise DataError(
                f"class {c.name!r} is in both the {split_of[c.name]} and the {c.split} split of {root}; "
                "keep each class in one split only"
            )
        for _, f in c.files:
            first = owner.setdefault(f, c)
            if first.split != c.split:
                raise DataError(
                    f"{f} is in both the {first.split} (class {first.name!r}) and the {c.split} split "
                    f"(class {c.name!r}) of {root}; keep each image in one split only"
                )


def _csv_classes(root: Path) -> tuple[list[ImageClass], list[Path]]:
    images = root / "images"
    classes, csvs = [], []
    for split in SPLIT_NAMES:
        path = root / f"{split}.csv"
        if not path.is_file():
            continue
        csvs.append(path)
        by_label: dict[str, list[tuple[str | None, str]]] = {}
        with open(path, newline="") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row or (line == 1 and [c.strip().lower() for c in row[:2]] == ["filename", "label"]):
                    continue
                if len(row) != 2:
                    raise DataError(f"{path}:{line}: expected 'filename,label', got {','.join(row)!r}")
                name, label = row[0].strip(), row[1].strip()
                file = images / name
                if not file.is_file():
                    raise DataError(f"{path}:{line}: {file} does not exist; is images/ complete?")
                by_label.setdefault(label, []).append((None, str(file)))
        for label in sorted(by_label):
            classes.append(ImageClass(label, split, sorted(by_label[label], key=lambda f: Path(f[1]).name)))
    return classes, csvs


def _omniglot_classes(root: Path) -> tuple[list[ImageClass], list]:
    # The same sources and deduplication as the Omniglot reader: the first source (by name) holding a character wins.
    try:
        sources = _find_sources(root)
    except (OSError, ValueError) as e:
        raise DataError(f"{root}: {e}") from None
    members: dict[str, list[tuple[str | None, str]]] = {}
    fingerprint = []
    for src in sources:
        found: dict[str, list[tuple[str | None, str]]] = {}
        for alphabet, character, m in src.members():
            ref = (str(src.path), m) if src.is_zip else (None, str(src.path / m))
            found.setdefault(f"{alphabet}/{character}", []).append(ref)
        for name, refs in found.items():
            members.setdefault(name, sorted(refs, key=lambda r: PurePosixPath(r[1]).name))
        fingerprint.append(src.fingerprint())
    if not members:
        raise DataError(f"no Omniglot images (<Alphabet>/<character>/*.png) under {root}")
    return [ImageClass(n, None, members[n]) for n in sorted(members)], fingerprint


def scan(root: str | os.PathLike, layout: str = "auto") -> Scan:
    """Recognise (``layout="auto"``) or check the layout of ``root`` and list its classes and files."""
    if layout not in LAYOUTS:
        raise DataError(f"task.layout = {layout!r} is not one of {', '.join(LAYOUTS)}")
    root = Path(root).expanduser().resolve()
    found = detect_layout(root)
    if layout == "auto":
        layout = found
    out = Scan(layout, root)
    try:
        if layout == "imagefolder":
            out.classes = _folder_classes(root, None)
            out.fingerprint = [_stat(Path(f), root) for c in out.classes for _, f in c.files]
        elif layout == "split_folders":
            dirs = _split_dirs(root)
            if "train" not in dirs:
                raise DataError(f"{root} has no train/ folder (layout split_folders: {{train,val,test}}/<class>/*)")
            out.classes = [c for split, d in dirs.items() for c in _folder_classes(d, split)]
            _check_disjoint(out.classes, root)
            out.fingerprint = [_stat(Path(f), root) for c in out.classes for _, f in c.files]
        elif layout == "csv":
            if not (root / "images").is_dir() or not (root / "train.csv").is_file():
                raise DataError(
                    f"{root} needs images/ and train.csv (layout csv: images/*.jpg, {{train,val,test}}.csv)"
                )
            out.classes, csvs = _csv_classes(root)
            _check_disjoint(out.classes, root)
            out.fingerprint = [_stat(p, root) for p in csvs] + [
                _stat(Path(f), root) for c in out.classes for _, f in c.files
            ]
        elif layout == "pickle":
            out.pickles = _pickle_files(root)
            if "train" not in out.pickles:
                raise DataError(f"{root} has no training pickle (mini-imagenet-cache-train.pkl or *_train.pickle)")
            out.fingerprint = [_stat(p, root) for p in out.pickles.values()]
        else:
            out.classes, out.fingerprint = _omniglot_classes(root)
    except OSError as e:
        raise DataError(f"cannot read {e.filename or root}: {e.strerror or e}") from None
    return out
