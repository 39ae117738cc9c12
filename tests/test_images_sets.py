"""Small generated image data sets in each layout metagrad reads (helpers of the image tests; holds no tests)."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_image", "make_imagefolder", "make_split_folders", "make_csv", "make_pickles", "class_pixels"]

SIZES = [(23, 17), (30, 30), (41, 29), (19, 33)]  # odd, non-square sizes


def class_pixels(c: int, i: int, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """Image ``i`` of class ``c``: a class colour plus a per-image gradient (uint8 [H, W(, 3)])."""
    w, h = size
    rng = np.random.default_rng(1000 * c + i)
    base = np.array([(37 * c) % 256, (91 * c + 40) % 256, (53 * c + 90) % 256], dtype=np.float64)
    ramp = np.linspace(0, 60, w)[None, :, None] * (1 + (i % 3)) / 3
    img = np.clip(base + ramp + rng.integers(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return img if channels == 3 else img.mean(axis=2).astype(np.uint8)


def write_image(path: Path, c: int, i: int, grey: bool = False) -> None:
    size = SIZES[(c + i) % len(SIZES)]
    img = Image.fromarray(class_pixels(c, i, size, 1 if grey else 3))
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


def _class_files(folder: Path, c: int, per_class: int, grey_all: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        ext = ".png" if (c + i) % 2 == 0 else ".jpg"
        write_image(folder / f"img{i:03d}{ext}", c, i, grey=grey_all or (c == 1 and i == 0))


def make_imagefolder(root: Path, classes: int = 10, per_class: int = 6, grey: bool = False) -> Path:
    """``root/class_XX/imgNNN.{png,jpg}``; class 1's first image is grey among colour ones (all grey if ``grey``)."""
    for c in range(classes):
        _class_files(root / f"class_{c:02d}", c, per_class, grey)
    return root


def make_split_folders(root: Path, per_split: tuple[int, int, int] = (6, 3, 3), per_class: int = 6) -> Path:
    """``root/{train,val,test}/<class>/*``, class numbers running on across splits."""
    c = 0
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        for _ in range(n):
            _class_files(root / split / f"n{c:08d}", c, per_class)
            c += 1
    return root


def make_csv(root: Path, per_split: tuple[int, int, int] = (6, 3, 3), per_class: int = 6) -> Path:
    """Ravi & Larochelle's miniImageNet layout: ``root/images/*.jpg`` and ``root/{train,val,test}.csv``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    c = 0
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for _ in range(n):
                label = f"n{c:08d}"
                for i in range(per_class):
                    name = f"{label}{i:08d}.jpg"
                    write_image(root / "images" / name, c, i, grey=(c == 1 and i == 0))
                    w.writerow([name, label])
                c += 1
    return root


def make_pickles(
    root: Path, style: str = "learn2learn", per_split: tuple[int, int, int] = (6, 3, 3), per_class: int = 6,
    side: int = 12, protocol: int = 4,
) -> Path:  # fmt: skip
    """learn2learn's ``mini-imagenet-cache-{split}.pkl`` or MetaOptNet's ``CIFAR_FS_{split}.pickle``."""
    root.mkdir(parents=True, exist_ok=True)
    c = 0
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        images, labels, class_dict = [], [], {}
        for _ in range(n):
            rows = []
            for i in range(per_class):
                rows.append(len(images))
                images.append(class_pixels(c, i, (side, side)))
                labels.append(c)
            class_dict[f"n{c:08d}"] = rows
            c += 1
        data = np.stack(images)
        if style == "learn2learn":
            obj, name = {"image_data": data, "class_dict": class_dict}, f"mini-imagenet-cache-{split}.pkl"
        else:
            obj, name = {"data": data, "labels": labels}, f"CIFAR_FS_{split}.pickle"
        (root / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return root


class _Exploit:
    """Unpickling this runs code (sets an attribute on the sys module): what the restricted unpickler must refuse."""

    def __reduce__(self):
        return (exec, ("import sys; sys.metagrad_pwned = True",))


def make_unsafe_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 1], "x": _Exploit()}))
    return path


def touch_changed(path: Path) -> None:
    """Rewrite an image with different pixels and a later modification time."""
    st = path.stat()
    img = Image.open(path)
    arr = 255 - np.asarray(img.convert("RGB"))
    Image.fromarray(arr).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
