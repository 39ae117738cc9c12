"""The ``images`` task family on generated data sets in every layout: classes and splits, shapes and channels,
seeded episodes, the cache, normalisation, augmentation, each bad input's one line, and ``metagrad data``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images_sets import (
    class_pixels,
    make_csv,
    make_imagefolder,
    make_pickles,
    make_split_folders,
    make_unsafe_pickle,
    touch_changed,
)

from metagrad.cli import main
from metagrad.errors import ConfigError, DataError, MetagradError
from metagrad.tasks import images as images_module
from metagrad.tasks.images import ImageEpisodes, ImagesConfig, describe, image_splits, load_images
from metagrad.tasks.omniglot import _omniglot, load_omniglot
from metagrad.tasks.safepickle import UnsafePickleError, load_safe_pickle

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared/data/omniglot"

LAYOUTS = {
    "imagefolder": (make_imagefolder, 10, None),
    "split_folders": (make_split_folders, 12, (6, 3, 3)),
    "csv": (make_csv, 12, (6, 3, 3)),
    "pickle_learn2learn": (make_pickles, 12, (6, 3, 3)),
    "pickle_metaoptnet_py2": (lambda r: make_pickles(r, "metaoptnet", protocol=2), 12, (6, 3, 3)),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))


def test_the_whole_session_caches_outside_the_home_folder(monkeypatch, tmp_path_factory):
    from metagrad.tasks.imagecache import default_cache_dir

    monkeypatch.undo()  # without this file's per-test cache: what every other test writes to
    where = default_cache_dir().resolve()
    assert where.is_relative_to(tmp_path_factory.getbasetemp().resolve()), where
    assert not where.is_relative_to(Path(__file__).resolve().parents[1]), where  # nor into the repository


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def family(root: Path, part: str = "train", **options) -> tuple:
    values = {"data": str(root), "image_size": 16, "shots": 1, "queries": 2, "ways": 3, "workers": 1, **options}
    cfg = ImagesConfig(**values)
    return ImageEpisodes.from_config(cfg, part), cfg


# ----- every layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_classes_splits_shapes_and_seeded_episodes(name, tmp_path):
    make, classes, per_split = LAYOUTS[name]
    root = make(tmp_path / name)
    data = load_images(root, image_size=16, workers=1)
    assert data.layout == name.split("_")[0] if name.startswith("pickle") else data.layout == name
    assert len(data.class_names) == classes and data.images.shape == (classes * 6, 3, 16, 16)
    assert data.images.dtype == torch.uint8 and (data.counts == 6).all()
    splits = image_splits(data)
    sizes = tuple(len(splits[s]) for s in ("train", "val", "test"))
    assert sizes == (per_split or (7, 1, 2))
    assert sorted(sum(splits.values(), [])) == list(range(classes))  # every class in exactly one split
    if per_split is not None:  # the user's split is kept: classes n0..n5 train, n6..n8 val, n9..n11 test
        named = [str(c) if "metaoptnet" in name else f"n{c:08d}" for c in (9, 10, 11)]  # MetaOptNet: labels
        assert [data.class_names[i] for i in splits["test"]] == named

    sampler, cfg = family(root)
    batch = sampler.sample(4, 1, 2, gen(0))
    assert batch.support_x.shape == (4, 3, 3, 16, 16) and batch.query_x.shape == (4, 6, 3, 16, 16)
    assert set(batch.info["classes"].flatten().tolist()) <= set(splits["train"])
    again = ImageEpisodes.from_config(dataclasses.replace(cfg), "train").sample(4, 1, 2, gen(0))
    assert torch.equal(batch.support_x, again.support_x) and torch.equal(batch.query_y, again.query_y)
    assert not torch.equal(batch.support_x, sampler.sample(4, 1, 2, gen(1)).support_x)
    test = ImageEpisodes.from_config(dataclasses.replace(cfg, ways=2), "test").sample(2, 1, 2, gen(0))
    assert set(test.info["classes"].flatten().tolist()) <= set(splits["test"])


def test_pixels_are_the_resized_files_and_grey_among_colour_is_replicated(tmp_path):
    root = make_imagefolder(tmp_path / "f", classes=3, per_class=4)
    data = load_images(root, image_size=16, workers=1)
    files = sorted((root / "class_01").iterdir())
    for row, f in zip(range(4, 8), files, strict=True):
        with Image.open(f) as im:
            mode = "L" if im.mode == "L" else "RGB"
            want = np.asarray(im.convert(mode).resize((16, 16), Image.Resampling.BILINEAR))
        got = data.images[row].numpy()
        if mode == "L":  # class 1's first image is grey: three equal channels among colour images
            assert all(np.array_equal(got[c], want) for c in range(3))
        else:
            assert np.array_equal(got, want.transpose(2, 0, 1))
    assert data.summary["grey_images"] == 1 and data.summary["colour_images"] == 11


def test_channels_follow_the_data_unless_set(tmp_path):
    grey = make_imagefolder(tmp_path / "g", classes=6, per_class=3, grey=True)
    assert load_images(grey, image_size=8, workers=1).channels == 1
    assert load_images(grey, image_size=8, channels=3, workers=1).channels == 3
    colour = make_imagefolder(tmp_path / "c", classes=3, per_class=3)
    one = load_images(colour, image_size=8, channels=1, workers=1)
    assert one.images.shape == (9, 1, 8, 8)
    sampler, _ = family(grey, image_size=16, ways=2)
    assert sampler.input_shape == (1, 16, 16)  # model.in_channels follows the data


def test_decoding_in_a_process_pool_gives_the_same_images(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "f", classes=4, per_class=6)
    inline = load_images(root, image_size=12, workers=1, cache=False)
    monkeypatch.setattr(images_module, "_INLINE", 0)
    monkeypatch.setattr(images_module, "_CHUNK", 5)
    pooled = load_images(root, image_size=12, workers=2, cache=False, progress=True)
    assert torch.equal(inline.images, pooled.images) and pooled.cache_path is None


def test_workers_zero_means_one_per_core_this_process_may_use(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "f", classes=2, per_class=2)
    asked = []

    def pool(max_workers, **kwargs):
        asked.append(max_workers)
        raise RuntimeError("no pool needed here")

    monkeypatch.setattr(images_module, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(images_module, "_INLINE", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    with pytest.raises(RuntimeError, match="no pool"):
        load_images(root, image_size=8, workers=0, cache=False)
    assert asked == [3]


def test_decoding_workers_open_their_own_zip_files(tmp_path, monkeypatch):
    import zipfile

    root = tmp_path / "omni"
    root.mkdir()
    with zipfile.ZipFile(root / "images_background.zip", "w") as z:
        for c in range(2):
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(class_pixels(c, i, (9, 9), 1)).save(buf, format="PNG")
                z.writestr(f"images_background/Alpha/character{c:02d}/{i}.png", buf.getvalue())
    inline = load_images(root, image_size=8, workers=1, cache=False)  # leaves this process a handle on the zip

    class Inherited:  # what a forked worker must not use: a handle whose file offset it shares with its parent
        def read(self, name):
            raise RuntimeError("read through an inherited zip handle")

    monkeypatch.setitem(images_module._ZIPS, str(root / "images_background.zip"), Inherited())
    monkeypatch.setattr(images_module, "_INLINE", 0)
    monkeypatch.setattr(images_module, "_CHUNK", 2)
    pooled = load_images(root, image_size=8, workers=2, cache=False)
    assert torch.equal(pooled.images, inline.images)


# ----- the cache ----------------------------------------------------------------------------------------------


def test_cache_is_memory_mapped_and_a_changed_file_is_read_again(tmp_path):
    root = make_imagefolder(tmp_path / "f", classes=3, per_class=3)
    first = load_images(root, image_size=8, workers=1)
    assert first.cache_path is not None and first.cache_path.parent == tmp_path / "cache"
    second = load_images(root, image_size=8, workers=1)
    assert second.cache_path == first.cache_path and torch.equal(first.images, second.images)
    assert second.summary == first.summary and second.class_names == first.class_names
    (root / "class_00" / "img000.png").write_bytes(b"")  # a cache hit opens no image: an empty file goes unseen...
    target = root / "class_02" / "img001.jpg"
    touch_changed(target)
    with pytest.raises(DataError, match="img000.png"):  # ...until a changed fingerprint forces a decode
        load_images(root, image_size=8, workers=1)
    make_imagefolder(tmp_path / "g", classes=3, per_class=3)
    touch_changed(tmp_path / "g" / "class_02" / "img001.jpg")
    changed = load_images(tmp_path / "g", image_size=8, workers=1)
    assert changed.cache_path != first.cache_path
    assert not torch.equal(changed.images[7], first.images[7]) and torch.equal(changed.images[0], first.images[0])


def test_a_failed_decode_leaves_no_cache_entry(tmp_path):
    root = make_imagefolder(tmp_path / "f", classes=3, per_class=3)
    (root / "class_01" / "img002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"class_01/img002\.png"):
        load_images(root, image_size=8, workers=1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_interrupted_pickle_conversion_leaves_no_file(tmp_path, monkeypatch):
    root = make_pickles(tmp_path / "p", side=10)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(images_module, "_convert", interrupted)  # 10 -> 8 pixels: every image is converted
    with pytest.raises(KeyboardInterrupt):
        load_images(root, image_size=8, workers=1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_killed_decodes_temporary_files_are_removed_by_the_next(tmp_path):
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [cache / f".images-{'a' * 24}.{dead.pid}.npy.tmp", cache / f".images-{'b' * 24}.json.{dead.pid}.tmp"]
    live = cache / f".images-{'c' * 24}.{os.getppid()}.npy.tmp"  # another process still decoding
    for p in [*stale, live]:
        p.write_bytes(b"half")
    load_images(make_imagefolder(tmp_path / "f", classes=3, per_class=2), image_size=8, workers=1)
    assert live.exists() and not any(p.exists() for p in stale)


def test_a_changed_pickle_is_read_again(tmp_path):
    root = make_pickles(tmp_path / "p")
    first = load_images(root, image_size=12, workers=1)
    assert torch.equal(first.images, load_images(root, image_size=12, workers=1).images)
    make_pickles(root, side=10)  # the same names, other contents and sizes
    assert load_images(root, image_size=12, workers=1).cache_path != first.cache_path


def _rewrite_pickles(root: Path, change) -> None:
    """Rewrite every learn2learn pickle under ``root`` with ``change(image_data)``."""
    for path in root.glob("*.pkl"):
        obj = pickle.loads(path.read_bytes())
        obj["image_data"] = change(obj["image_data"])
        path.write_bytes(pickle.dumps(obj))


def test_pickled_arrays_channels_last_first_or_grey(tmp_path):
    nhwc = load_images(make_pickles(tmp_path / "nhwc", side=10), image_size=10, workers=1, cache=False)
    nchw = make_pickles(tmp_path / "nchw", side=10)
    _rewrite_pickles(nchw, lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # [N, 3, 10, 10]
    got = load_images(nchw, image_size=10, workers=1, cache=False)
    assert torch.equal(got.images, nhwc.images) and got.summary["sizes"] == {"10x10": 72}
    grey = make_pickles(tmp_path / "grey", side=10)
    _rewrite_pickles(grey, lambda a: a[..., 0])  # [N, H, W]
    assert torch.equal(load_images(grey, image_size=10, workers=1, cache=False).images, nhwc.images[:, :1])
    odd = make_pickles(tmp_path / "odd", side=10)
    _rewrite_pickles(odd, lambda a: np.zeros((len(a), 5, 10, 10), np.uint8))
    with pytest.raises(DataError, match=r"cache-\w+\.pkl: images of shape \(\d+, 5, 10, 10\).*\[N, C, H, W\]"):
        load_images(odd, image_size=10, workers=1, cache=False)


# ----- normalisation and augmentation ----------------------------------------------------------------------


def test_normalisation_comes_from_the_training_classes_and_is_recorded(tmp_path):
    root = make_split_folders(tmp_path / "s")
    data = load_images(root, image_size=16, workers=1)
    sampler, cfg = family(root, "test")
    train = data.images[data.labels < 6].to(torch.float64) / 255
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(torch.tensor(cfg.mean, dtype=torch.float64), mean)
    torch.testing.assert_close(torch.tensor(cfg.std, dtype=torch.float64), std)
    batch = sampler.sample(2, 1, 2, gen(0))  # test episodes, normalised with the training statistics
    raw = data.images[batch.info["support_index"]].to(torch.float32) / 255
    want = (raw - mean.float()[:, None, None]) / std.float()[:, None, None]
    torch.testing.assert_close(batch.support_x, want)
    given = ImageEpisodes.from_config(dataclasses.replace(cfg, mean=[0.5] * 3, std=[0.25] * 3), "test")
    torch.testing.assert_close(given.sample(2, 1, 2, gen(0)).support_x, (raw - 0.5) / 0.25)
    off = ImageEpisodes.from_config(dataclasses.replace(cfg, normalize=False), "test")
    torch.testing.assert_close(off.sample(2, 1, 2, gen(0)).support_x, raw)


def test_channel_statistics_match_float64_sums(tmp_path):
    images = torch.randint(0, 256, (50, 3, 9, 7), dtype=torch.uint8, generator=gen(0))
    images[:, 2] = 200  # a constant channel: std floored, not zero
    np.save(tmp_path / "x.npy", images.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "x.npy", mmap_mode="c"))
    rows = torch.tensor([41, 3, 7, 8, 9, 30, 31, 0, 49, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    x = images[rows].to(torch.float64) / 255
    want_mean, want_std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3), correction=0).clamp_min(1e-3)
    mean, std = images_module.channel_statistics(mapped, rows, chunk=4)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), want_mean, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), want_std, rtol=1e-9, atol=0)
    assert std[2] == 1e-3 and mean[2] == 200 / 255


def test_mean_without_std_or_of_the_wrong_length_is_refused(tmp_path):
    root = make_split_folders(tmp_path / "s", per_split=(3, 1, 1), per_class=3)
    for half in ({"mean": [0.5] * 3}, {"std": [0.25] * 3}):
        with pytest.raises(ConfigError, match="task.mean and task.std must be set together"):
            family(root, **half)
    with pytest.raises(ConfigError, match="must hold 3 values"):
        family(root, mean=[0.5], std=[0.25])


def test_augmentation_is_training_only_crops_and_flips(tmp_path):
    root = make_split_folders(tmp_path / "s")
    plain, cfg = family(root, normalize=False)
    flips, _ = family(root, normalize=False, augment=True, crop_padding=0)
    a, b = plain.sample(3, 1, 2, gen(0)), flips.sample(3, 1, 2, gen(0))
    assert torch.equal(a.info["support_index"], b.info["support_index"])  # the same episode, then augmented
    same = (a.query_x == b.query_x).flatten(2).all(-1)
    mirrored = (a.query_x.flip(-1) == b.query_x).flatten(2).all(-1)
    assert (same | mirrored).all() and mirrored.any() and same.any()
    padded, _ = family(root, normalize=False, augment=True, crop_padding=3)
    c = padded.sample(3, 1, 2, gen(0))
    assert c.support_x.shape == a.support_x.shape and not torch.equal(c.support_x, a.support_x)
    test = ImageEpisodes.from_config(dataclasses.replace(cfg, augment=True), "test")
    assert test.augment is None


# ----- bad input: one line each, a MetagradError from Python, exit 2 from the CLI --------------------------------


def _one_line(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err


def test_each_bad_input_is_one_line(tmp_path, capsys):
    corrupt = make_imagefolder(tmp_path / "corrupt", classes=3, per_class=3)
    (corrupt / "class_02" / "img001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=r"cannot decode image .*class_02/img001\.jpg"):
        load_images(corrupt, image_size=8, workers=1)
    _one_line(capsys, ["data", str(corrupt)], "class_02/img001.jpg")

    empty = make_imagefolder(tmp_path / "empty", classes=3, per_class=3)
    (empty / "class_09").mkdir()
    with pytest.raises(DataError, match="class_09 has no images"):
        load_images(empty, image_size=8)
    _one_line(capsys, ["data", str(empty)], "class_09 has no images")

    nothing = tmp_path / "nothing"
    (nothing / "a").mkdir(parents=True)
    (nothing / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"looked for .*imagefolder.*split_folders.*csv.*pickle.*omniglot"):
        load_images(nothing)
    _one_line(capsys, ["data", str(nothing)], "no image data set recognised")

    few = make_split_folders(tmp_path / "few", per_split=(2, 3, 3), per_class=3)
    with pytest.raises(ConfigError, match="task.ways = 3 exceeds the 2 classes of the train split"):
        family(few)
    with pytest.raises(ConfigError, match=r"has 3 images; task.shots \+ task.queries = 4"):
        family(few, "val", queries=3)
    with pytest.raises(ConfigError, match="brings its own train/val/test split"):
        family(few, "val", split_ratios=[0.5, 0.25, 0.25])
    run = ["train", "--out", str(tmp_path / "run"), "--no-progress", "task.name=images", f"task.data={few}",
           "task.image_size=16", "model.name=conv4", "train.iterations=1"]  # fmt: skip
    _one_line(capsys, run, "task.ways = 5 exceeds the 2 classes of the train split")

    pickles = make_pickles(tmp_path / "unsafe", style="metaoptnet")
    make_unsafe_pickle(pickles / "CIFAR_FS_val.pickle")
    with pytest.raises(UnsafePickleError, match=r"CIFAR_FS_val\.pickle: refused to unpickle builtins\.exec"):
        load_images(pickles, image_size=8)
    assert not hasattr(sys, "metagrad_pwned")
    _one_line(capsys, ["data", str(pickles)], "CIFAR_FS_val.pickle")
    assert not hasattr(sys, "metagrad_pwned")


def test_a_class_or_file_in_two_splits_is_refused(tmp_path):
    folders = make_split_folders(tmp_path / "s", per_split=(2, 1, 1), per_class=2)
    (folders / "test" / "n00000003").rename(folders / "test" / "n00000001")  # also a training class
    with pytest.raises(DataError, match="class 'n00000001' is in both the train and the test split"):
        load_images(folders, image_size=8, workers=1)
    label = make_csv(tmp_path / "c", per_split=(2, 1, 1), per_class=2)
    (label / "val.csv").write_text((label / "val.csv").read_text().replace(",n00000002", ",n00000000"))
    with pytest.raises(DataError, match="class 'n00000000' is in both the train and the val split"):
        load_images(label, image_size=8, workers=1)
    file = make_csv(tmp_path / "f", per_split=(2, 1, 1), per_class=2)
    rows = (file / "test.csv").read_text().replace("n0000000300000001.jpg", "n0000000000000001.jpg")
    (file / "test.csv").write_text(rows)
    with pytest.raises(DataError, match=r"0000000001\.jpg is in both the train \(class 'n00000000'\) and the test"):
        load_images(file, image_size=8, workers=1)


def test_restricted_unpickler_reads_plain_containers_only(tmp_path):
    safe = {"data": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "labels": [1, 2], "name": "x", "f": 1.5}
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(safe, protocol=protocol))
        got = load_safe_pickle(path)
        assert np.array_equal(got["data"], safe["data"]) and got["labels"] == [1, 2] and got["name"] == "x"
    bad = {
        "object_array": {"a": np.array([1, "x"], dtype=object)},
        "set": {"s": {1, 2}},
        "ordered_dict": __import__("collections").OrderedDict(a=1),
    }
    for name, value in bad.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps(value))
        with pytest.raises(UnsafePickleError, match=f"{name}.pkl"):
            load_safe_pickle(path)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps(safe)[:40])
    with pytest.raises(DataError, match="truncated.pkl is not a readable pickle"):
        load_safe_pickle(truncated)
    assert issubclass(UnsafePickleError, MetagradError)


# ----- Omniglot, and `metagrad data` -----------------------------------------------------------------------


def test_omniglot_through_the_image_path_matches_the_omniglot_reader(tmp_path):
    assert OMNIGLOT.is_dir(), f"the shared Omniglot subset is missing at {OMNIGLOT}"
    mine = load_images(OMNIGLOT, image_size=28, resample="lanczos", workers=2)
    theirs = load_omniglot(OMNIGLOT, size=28, dtype=torch.uint8, cache_dir=tmp_path / "omniglot-cache")
    assert mine.layout == "omniglot" and mine.channels == 1
    assert mine.class_names == theirs.class_names and torch.equal(mine.labels, theirs.labels)
    assert torch.equal(255 - mine.images, theirs.images)  # the same pixels; Omniglot's reader inverts them


def test_omniglot_reader_refuses_other_layouts(tmp_path):
    root = make_split_folders(tmp_path / "mini", per_split=(2, 1, 1), per_class=2)
    with pytest.raises(DataError, match='split_folders image data set, not Omniglot.*task.name = "images"'):
        _omniglot(str(root), 28, False)


def test_metagrad_data_prints_layout_splits_sizes_and_channels(tmp_path, capsys):
    root = make_csv(tmp_path / "mini")
    assert main(["data", str(root), "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "layout csv, 12 classes, 72 images" in out and "the data set's own" in out
    assert "train      6 classes       36 images (6 per class)" in out
    assert "41x29" in out and "71 colour, 1 grey" in out and "decoded: 3 x 16 x 16" in out
    data = load_images(root, image_size=16)
    assert describe(data) in out


def test_split_ratios_split_unsplit_layouts_seeded(tmp_path):
    data = load_images(make_imagefolder(tmp_path / "f", classes=10, per_class=3), image_size=8, workers=1)
    splits = image_splits(data, [0.5, 0.2, 0.3])
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    assert splits == image_splits(data, [0.5, 0.2, 0.3]) and splits != image_splits(data)
    with pytest.raises(ConfigError, match="split_ratios"):
        family(tmp_path / "f", split_ratios=[0.5, 0.5])


@pytest.fixture(scope="module")
def five_way_set(tmp_path_factory):
    return make_split_folders(tmp_path_factory.mktemp("five"), per_split=(5, 5, 5), per_class=16)  # 1 + 15 each


IMAGE_PRESETS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/[mc][i]*/*.toml")
                       if p.name != "benchmark.toml")  # fmt: skip


@pytest.mark.parametrize("path", IMAGE_PRESETS, ids=[f"{p.parent.name}/{p.stem}" for p in IMAGE_PRESETS])
def test_image_configs_build_their_learner_on_a_generated_set(path, five_way_set):
    from metagrad.build import build_learner, build_task
    from metagrad.config import load_config

    root = five_way_set
    cfg = load_config(path, [f"task.data={root}", "task.workers=1"])
    assert cfg.task.name == "images" and cfg.eval.steps >= 10
    task = build_task(cfg, "train")
    side = 84 if "miniimagenet" in str(path) else 32
    assert task.input_shape == (3, side, side) and len(cfg.task.mean) == 3
    learner = build_learner(cfg)
    batch = task.sample(1, cfg.task.shots, cfg.task.queries, gen(0))
    assert learner.predict(batch.query_x[0]).shape == (75, 5)


def test_compare_runs_an_image_benchmark_on_the_users_folder(five_way_set, tmp_path, capsys):
    """`metagrad compare --task miniimagenet --data DIR`: the shipped presets on the user's data set."""
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "miniimagenet", "--data", str(five_way_set), "--budget", "tiny",
            "--algorithms", "maml", "fomaml", "--out", str(out), "--no-progress", "--workers", "1"]  # fmt: skip
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "maml" in report and "fomaml" in report
    run = json.loads((out / "maml" / "run.json").read_text())
    assert run["config"]["task"]["data"] == str(five_way_set)
    capsys.readouterr()
    code = main(["compare", "--task", "sinusoid", "--data", str(five_way_set), "--budget", "tiny", "--out",
                 str(tmp_path / "x"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "reads no data set" in err[0]
    assert not (tmp_path / "x").exists()
