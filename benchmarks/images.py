"""Image data set speed: images decoded per second on first load, the load time from the cache, episodes per second.

Generates ``--classes`` x ``--per-class`` 84x84 RGB JPEGs (default 100 x 600 = 60,000, miniImageNet's size) in the
Ravi & Larochelle CSV layout under a temporary folder (or ``--dir``), then times, with a private cache:

1. the first ``load_images`` (listing, decoding in ``--workers`` processes, writing the memory-mapped cache);
2. a second ``load_images`` (listing and fingerprinting the files, opening the cache), best of ``--repeats``;
3. episode sampling from the ``images`` family (5-way 1-shot, 15 queries, meta-batch 4, normalised), episodes/s.

    python benchmarks/images.py --json docs/data/images_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import load_average, machine_info, write_json
from PIL import Image

from metagrad.tasks.images import ImageEpisodes, ImagesConfig, load_images


def _write_class(args: tuple[Path, int, int, int]) -> list[str]:
    images, c, per_class, side = args
    rng = np.random.default_rng(c)
    colour = rng.integers(0, 256, 3)
    names = []
    for i in range(per_class):
        pixels = np.clip(colour + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
        name = f"n{c:08d}{i:08d}.jpg"
        Image.fromarray(pixels).save(images / name, quality=90)
        names.append(name)
    return names


def generate(root: Path, classes: int, per_class: int, side: int, workers: int) -> None:
    """``root/images/*.jpg`` and ``root/{train,val,test}.csv`` with 64/16/20 % of the classes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        names = list(pool.map(_write_class, [(root / "images", c, per_class, side) for c in range(classes)]))
    bounds = [0, round(classes * 0.64), round(classes * 0.80), classes]
    for split, lo, hi in zip(("train", "val", "test"), bounds, bounds[1:], strict=False):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in range(lo, hi):
                w.writerows([n, f"n{c:08d}"] for n in names[c])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=600)
    p.add_argument("--side", type=int, default=84, help="generated JPEG size (and image_size)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.add_argument("--repeats", type=int, default=3, help="cache loads timed (best kept)")
    p.add_argument("--episodes", type=int, default=2000, help="meta-batches sampled for episodes/s")
    p.add_argument("--dir", type=Path, help="where to generate the set (default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args()
    torch.set_num_threads(1)
    base = a.dir or Path(tempfile.mkdtemp(prefix="metagrad-images-bench-"))
    root, cache = base / "data", base / "cache"
    try:
        t = time.perf_counter()
        generate(root, a.classes, a.per_class, a.side, a.workers)
        n = a.classes * a.per_class
        print(f"generated {n} {a.side}x{a.side} JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)

        t = time.perf_counter()
        first = load_images(root, image_size=a.side, cache_dir=cache, workers=a.workers, progress=sys.stderr.isatty())
        decode_s = time.perf_counter() - t
        cached = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            again = load_images(root, image_size=a.side, cache_dir=cache, workers=a.workers)
            cached.append(time.perf_counter() - t)
        assert torch.equal(first.images[::997], again.images[::997])

        os.environ["METAGRAD_CACHE"] = str(cache)
        cfg = ImagesConfig(data=str(root), image_size=a.side, ways=5, shots=1, queries=15, workers=a.workers)
        t = time.perf_counter()
        sampler = ImageEpisodes.from_config(cfg, "train")  # includes the training classes' normalisation
        family_s = time.perf_counter() - t
        g = torch.Generator().manual_seed(0)
        sampler.sample(4, 1, 15, g)
        t = time.perf_counter()
        for _ in range(a.episodes):
            sampler.sample(4, 1, 15, g)
        episodes_per_s = a.episodes * 4 / (time.perf_counter() - t)

        result = {
            "images": n, "side": a.side, "workers": a.workers, "cache_bytes": first.cache_path.stat().st_size,
            "first_load_s": decode_s, "images_decoded_per_s": n / decode_s, "cache_load_s": min(cached),
            "family_build_s": family_s, "episodes_per_s": episodes_per_s, "episode": "5-way 1-shot 15-query, 4/batch",
            "machine": machine_info(torch.device("cpu")), "load_average": load_average(),
        }  # fmt: skip
        for k in ("first_load_s", "images_decoded_per_s", "cache_load_s", "family_build_s", "episodes_per_s"):
            print(f"{k:>22}: {result[k]:.4g}")
        if a.json:
            write_json(a.json, result)
    finally:
        if a.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
