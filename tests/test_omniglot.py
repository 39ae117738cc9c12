"""Omniglot loading (real data, offline), episode sampling, the Conv-4 network and a short MAML run on it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

from metagrad.algorithms import MAML
from metagrad.models.conv4 import Conv4
from metagrad.tasks import TaskBatch, TaskDistribution
from metagrad.tasks import omniglot as omniglot_module
from metagrad.tasks.episodes import EpisodeSampler
from metagrad.tasks.omniglot import (
    ROTATION_SEPARATOR,
    alphabet_of,
    augment_rotations,
    lake_task_batch,
    load_lake_runs,
    load_omniglot,
    split_classes,
)

DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
ZIPS = ("images_background_small1.zip", "images_background_small2.zip", "all_runs.zip")
needs_data = pytest.mark.skipif(
    not all((DATA / z).is_file() for z in ZIPS),
    reason=f"Omniglot subset not found at {DATA} (expects {', '.join(ZIPS)}; see shared/data/omniglot/README.md)",
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """The real subset, decoded once into a cache folder private to this test session."""
    if not all((DATA / z).is_file() for z in ZIPS):
        pytest.skip(f"Omniglot subset not found at {DATA}")
    cache = tmp_path_factory.mktemp("omniglot-cache")
    return load_omniglot(DATA, cache_dir=cache), cache


def toy(classes: int = 10, per_class: int = 7, uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i (so an image tells its row); labels interleaved rather than class-major."""
    n = classes * per_class
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4).clone()
    if uint8:
        images = images.to(torch.uint8)
    return images, torch.arange(n) % classes


# ----- EpisodeSampler ---------------------------------------------------------------------------------


def test_sampler_is_a_task_distribution_with_shapes_and_dtypes():
    images, labels = toy()
    s = EpisodeSampler(images, labels, ways=4)
    assert isinstance(s, TaskDistribution) and s.name == "omniglot"
    b = s.sample(6, 2, 3, gen(0))
    assert isinstance(b, TaskBatch) and len(b) == 6
    assert b.support_x.shape == (6, 8, 1, 4, 4) and b.query_x.shape == (6, 12, 1, 4, 4)
    assert b.support_y.shape == (6, 8) and b.query_y.shape == (6, 12)
    assert b.support_y.dtype == b.query_y.dtype == torch.int64
    assert b.support_x.dtype == b.query_x.dtype == torch.get_default_dtype()


def test_sampler_follows_default_dtype_and_scales_uint8(float64):
    images, labels = toy(uint8=True)
    b = EpisodeSampler(images, labels, ways=3).sample(2, 1, 1, gen(0))
    assert b.support_x.dtype == torch.float64
    assert torch.equal(b.support_x, images[b.info["support_index"]].double() / 255)


@pytest.mark.parametrize("shuffle", [True, False])
def test_episode_invariants(shuffle):
    images, labels = toy(classes=10, per_class=7)
    n, k, q, tasks = 5, 2, 3, 40
    b = EpisodeSampler(images, labels, ways=n, shuffle=shuffle).sample(tasks, k, q, gen(1))
    for t in range(tasks):
        s_rows, q_rows = b.info["support_index"][t], b.info["query_index"][t]
        # The images are the rows the info says, and each label stands for one class.
        assert torch.equal(b.support_x[t, :, 0, 0, 0].long(), s_rows)
        assert torch.equal(b.query_x[t, :, 0, 0, 0].long(), q_rows)
        classes = b.info["classes"][t]
        assert classes.unique().numel() == n  # N distinct classes
        assert torch.equal(labels[s_rows], classes[b.support_y[t]])
        assert torch.equal(labels[q_rows], classes[b.query_y[t]])
        # Labels 0..N-1, K support and Q query points each.
        assert torch.equal(torch.bincount(b.support_y[t], minlength=n), torch.full((n,), k))
        assert torch.equal(torch.bincount(b.query_y[t], minlength=n), torch.full((n,), q))
        # K+Q distinct images per class, support and query disjoint.
        rows = torch.cat([s_rows, q_rows])
        assert rows.unique().numel() == n * (k + q)
    if not shuffle:
        assert torch.equal(b.support_y[0], torch.arange(n).repeat_interleave(k))
    # The label of a class is random per task: label 0 is not always the smallest class chosen.
    first = b.info["classes"][:, 0]
    assert (first != b.info["classes"].min(dim=1).values).any()
    assert b.info["classes"].unique().numel() == 10


def test_sampler_classes_subset_and_unequal_class_sizes():
    images, labels = toy(classes=6, per_class=5)
    labels = labels.clone()
    labels[:6] = 0  # class 0 now has 10 images, the other classes 4
    s = EpisodeSampler(images, labels, ways=2, classes=[0, 3, 4])
    assert s.num_classes == 3 and s.min_images_per_class == 4
    b = s.sample(30, 1, 3, gen(0))
    assert set(b.info["classes"].unique().tolist()) == {0, 3, 4}
    for t in range(30):
        assert torch.cat([b.info["support_index"][t], b.info["query_index"][t]]).unique().numel() == 8
    with pytest.raises(ValueError, match="smallest class"):
        s.sample(1, 2, 3, gen(0))


def test_sampler_same_seed_same_tasks_different_seed_different_tasks_global_rng_untouched():
    images, labels = toy()
    s = EpisodeSampler(images, labels, ways=5)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = s.sample(8, 1, 2, gen(3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(8)  # the tasks do not depend on the global RNG either
    b = s.sample(8, 1, 2, gen(3))
    c = s.sample(8, 1, 2, gen(4))
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.info["support_index"], c.info["support_index"])
    g = gen(3)
    assert not torch.equal(s.sample(8, 1, 2, g).support_x, s.sample(8, 1, 2, g).support_x)


def test_sampler_errors():
    images, labels = toy(classes=4, per_class=5)
    with pytest.raises(ValueError, match="ways=5 exceeds the 4 classes"):
        EpisodeSampler(images, labels, ways=5)
    s = EpisodeSampler(images, labels, ways=4)
    with pytest.raises(ValueError, match=r"shots \+ queries = 6 exceeds the 5 images"):
        s.sample(2, 3, 3, gen(0))
    s.sample(2, 2, 3, gen(0))  # exactly all the images of every class is fine
    with pytest.raises(ValueError, match="positive"):
        s.sample(0, 1, 1, gen(0))
    with pytest.raises(ValueError, match="same N"):
        EpisodeSampler(images, labels[:-1], ways=2)
    with pytest.raises(ValueError, match="without images"):
        EpisodeSampler(images, labels, ways=2, classes=[0, 9])


# ----- the real data ------------------------------------------------------------------------------------


@needs_data
def test_real_subset_counts(omniglot):
    (images, labels, names), _ = omniglot
    alphabets = sorted({alphabet_of(n) for n in names})
    assert alphabets == [
        "Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"
    ]  # fmt: skip
    assert len(names) == len(set(names)) == 242  # Greek (24) and Latin (26) counted once
    assert sum(alphabet_of(n) == "Greek" for n in names) == 24
    assert sum(alphabet_of(n) == "Latin" for n in names) == 26
    assert images.shape == (4840, 1, 28, 28) and labels.shape == (4840,)
    assert torch.equal(torch.bincount(labels), torch.full((242,), 20))  # 20 drawers per character
    assert torch.equal(labels, torch.arange(242).repeat_interleave(20))  # class-major


@needs_data
def test_real_images_range_and_polarity(omniglot):
    (images, _, _), _ = omniglot
    assert images.dtype == torch.float32
    assert images.min() == 0 and images.max() == 1
    assert images.mean() < 0.2  # strokes are 1 on a background of 0 (inverted)
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    assert border.mean() < 0.02
    assert (images.flatten(1).max(1).values > 0.5).all()  # every drawing has ink


@needs_data
def test_cache_roundtrip_and_uint8(omniglot, monkeypatch):
    (images, labels, names), cache = omniglot
    assert len(list(cache.glob("*.safetensors"))) == 1

    def decoded(*args):
        raise AssertionError("decoded again instead of read from the cache")

    monkeypatch.setattr(omniglot_module, "_decode_all", decoded)
    again = load_omniglot(DATA, cache_dir=cache, dtype=torch.uint8)
    assert again.images.dtype == torch.uint8
    assert torch.equal(again.images.float() / 255, images)
    assert torch.equal(again.labels, labels) and again.class_names == names


@needs_data
def test_extracted_folder_reads_like_the_zip(omniglot, tmp_path):
    (images, labels, names), _ = omniglot
    with zipfile.ZipFile(DATA / "images_background_small2.zip") as z:
        members = [m for m in z.namelist() if m.startswith("images_background_small2/Tagalog/")]
        z.extractall(tmp_path / "extracted", members=members)
    (tmp_path / "extracted" / "images_background_small2").rename(tmp_path / "extracted" / "images_tagalog")
    sub = load_omniglot(tmp_path / "extracted", cache=False)
    rows = torch.tensor([alphabet_of(names[i]) == "Tagalog" for i in labels.tolist()])
    assert sub.class_names == [n for n in names if alphabet_of(n) == "Tagalog"]
    assert torch.equal(sub.images, images[rows])


@needs_data
def test_real_episodes(omniglot):
    (images, labels, _), _ = omniglot
    b = EpisodeSampler(images, labels, ways=20).sample(4, 5, 15, gen(0))  # all 20 drawings of 20 characters
    assert b.support_x.shape == (4, 100, 1, 28, 28) and b.query_x.shape == (4, 300, 1, 28, 28)
    for t in range(4):
        assert torch.cat([b.info["support_index"][t], b.info["query_index"][t]]).unique().numel() == 400
    with pytest.raises(ValueError, match="exceeds the 20 images"):
        EpisodeSampler(images, labels, ways=5).sample(1, 1, 20, gen(0))


@needs_data
def test_lake_runs():
    runs = load_lake_runs(DATA)
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for r in runs:
        assert r.train_images.shape == r.test_images.shape == (20, 1, 28, 28)
        assert r.test_labels.dtype == torch.int64
        assert sorted(r.test_labels.tolist()) == list(range(20))  # one test item per class
        assert 0 <= r.test_images.min() and r.test_images.max() <= 1 and r.test_images.mean() < 0.2
    # run01/class_labels.txt starts "run01/test/item01.png run01/training/class08.png".
    assert runs[0].test_labels[0] == 7
    # Pixel 1-nearest-neighbour is far above chance (5%) only if the labels are parsed right (Lake: ~21.7%).
    hits = [(torch.cdist(r.test_images.flatten(1), r.train_images.flatten(1)).argmin(1) == r.test_labels) for r in runs]
    assert torch.cat(hits).float().mean() > 0.12
    b = lake_task_batch(runs)
    assert b.support_x.shape == (20, 20, 1, 28, 28) and torch.equal(b.support_y[3], torch.arange(20))


# ----- class splits and rotations ---------------------------------------------------------------------


NAMES = [f"{a}/character{c:02d}" for a in ("Alpha", "Beta", "Gamma", "Delta", "Epsilon") for c in range(1, 7)]


def test_split_by_alphabet_is_disjoint_and_seeded():
    tr, va, te = split_classes(NAMES, "alphabet", (0.6, 0.2, 0.2), seed=0)
    assert sorted(tr + va + te) == list(range(len(NAMES)))
    groups = [{alphabet_of(NAMES[i]) for i in s} for s in (tr, va, te)]
    assert [len(g) for g in groups] == [3, 1, 1]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert split_classes(NAMES, "alphabet", seed=0) == split_classes(NAMES, "alphabet", seed=0)
    assert len({tuple(split_classes(NAMES, "alphabet", seed=s)[2]) for s in range(10)}) > 1


def test_split_by_character_and_explicit_alphabets():
    tr, va, te = split_classes(NAMES, "character", (0.5, 0.0, 0.5), seed=1)
    assert len(tr) == len(te) == 15 and va == [] and not set(tr) & set(te)
    tr, va, te = split_classes(NAMES, alphabets=(["Alpha", "Beta"], [], ["Epsilon"]))
    assert {alphabet_of(NAMES[i]) for i in tr} == {"Alpha", "Beta"} and va == []
    assert {alphabet_of(NAMES[i]) for i in te} == {"Epsilon"}
    with pytest.raises(ValueError, match="unknown alphabet"):
        split_classes(NAMES, alphabets=(["Omega"], [], []))
    with pytest.raises(ValueError, match="fractions"):
        split_classes(NAMES, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="mode"):
        split_classes(NAMES, mode="drawer")


@needs_data
def test_real_alphabet_split(omniglot):
    (_, _, names), _ = omniglot
    splits = split_classes(names, "alphabet", (0.6, 0.2, 0.2), seed=0)
    alphabets = [{alphabet_of(names[i]) for i in s} for s in splits]
    assert [len(a) for a in alphabets] == [5, 2, 1] and len(set.union(*alphabets)) == 8


def test_rotation_augmentation():
    images = torch.rand(6, 1, 5, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    names = ["A/character01", "A/character02", "B/character01"]
    aug = augment_rotations(images, labels, names)
    assert aug.images.shape == (24, 1, 5, 5) and len(aug.class_names) == 12
    assert torch.equal(torch.bincount(aug.labels), torch.full((12,), 2))
    assert aug.class_names[:4] == ["A/character01", "A/character01@90", "A/character01@180", "A/character01@270"]
    for r, angle in enumerate((0, 90, 180, 270)):
        block = aug.images[6 * r : 6 * (r + 1)]
        assert torch.equal(aug.labels[6 * r : 6 * (r + 1)], labels * 4 + r)
        assert torch.equal(torch.rot90(block, -angle // 90, dims=(-2, -1)), images)  # rotating back recovers it
        if angle:
            assert not torch.equal(block, images)
    # Splits keep every rotation of a character together.
    tr, _, te = split_classes(aug.class_names, "character", (0.5, 0.0, 0.5), seed=0)
    base = [{aug.class_names[i].split(ROTATION_SEPARATOR)[0] for i in s} for s in (tr, te)]
    assert not base[0] & base[1]
    with pytest.raises(ValueError, match="multiples of 90"):
        augment_rotations(images, labels, names, angles=(0, 45))


# ----- Conv4 ---------------------------------------------------------------------------------------------


def test_conv4_shapes_and_no_buffers():
    m = Conv4(ways=5)
    assert m(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    assert Conv4(in_channels=3, ways=20, hidden=8, image_size=84)(torch.rand(2, 3, 84, 84)).shape == (2, 20)
    assert list(m.buffers()) == []
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == 4 * 4 + 2  # conv weight+bias, BN weight+bias per block; head
    m.eval()  # no running statistics: evaluation mode normalises with the batch too
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(m(x), m.train()(x))
    with pytest.raises(ValueError):
        Conv4(image_size=8)


def test_conv4_vmap_matches_loop():
    torch.manual_seed(0)
    m = Conv4(ways=3, hidden=8)
    params = dict(m.named_parameters())
    x = torch.rand(4, 6, 1, 28, 28)

    def f(p, xs):
        return functional_call(m, p, (xs,))

    batched = vmap(f, in_dims=(None, 0))(params, x)
    looped = torch.stack([f(params, xi) for xi in x])
    assert batched.shape == (4, 6, 3)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)


def test_conv4_second_order_gradient_matches_finite_differences(float64):
    """d/dθ L_query(θ − α ∇θ L_support(θ)) (MAML's meta-gradient, through BatchNorm) vs central differences,
    vmapped over two tasks."""
    torch.manual_seed(0)
    m = Conv4(ways=2, hidden=3, image_size=16)
    params = {k: v.detach() for k, v in m.named_parameters()}
    sx, qx = torch.rand(2, 4, 1, 16, 16), torch.rand(2, 4, 1, 16, 16)
    sy, qy = torch.tensor([[0, 1, 0, 1]] * 2), torch.tensor([[1, 0, 1, 0]] * 2)

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(m, p, (x,)), y)

    def meta(p, sx, sy, qx, qy):
        g = grad(loss)(p, sx, sy)
        return loss({k: p[k] - 0.5 * g[k] for k in p}, qx, qy)

    per_task = vmap(grad(meta), in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
    for t in range(2):
        g = grad(meta)(params, sx[t], sy[t], qx[t], qy[t])
        for k in g:
            torch.testing.assert_close(per_task[k][t], g[k])
        v = {k: torch.randn_like(p) for k, p in params.items()}
        eps = 1e-6
        plus = meta({k: params[k] + eps * v[k] for k in params}, sx[t], sy[t], qx[t], qy[t])
        minus = meta({k: params[k] - eps * v[k] for k in params}, sx[t], sy[t], qx[t], qy[t])
        fd = (plus - minus) / (2 * eps)
        analytic = sum((g[k] * v[k]).sum() for k in g)
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-7)


# ----- a short real training run --------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """On two shared cores, intra-op threads contend with the other processes (up to 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_data
def test_maml_conv4_learns_5way_1shot_on_held_out_characters(omniglot, one_thread):
    (images, labels, names), _ = omniglot
    train_cls, _, test_cls = split_classes(names, "character", (0.7, 0.0, 0.3), seed=0)
    train = EpisodeSampler(images, labels, ways=5, classes=train_cls)
    test = EpisodeSampler(images, labels, ways=5, classes=test_cls)
    torch.manual_seed(0)
    # Second order: on this budget it learns far faster per second than first order (the check for
    # first_order=True would need several times more iterations to clear the same bar).
    learner = MAML(Conv4(ways=5, hidden=32), inner_lr=0.4, inner_steps=1, first_order=False, loss="cross_entropy")
    for p in learner.params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(learner.params.values()), lr=1e-3)
    g = gen(0)
    eval_batch = test.sample(100, 1, 5, gen(12345))

    def accuracy() -> float:
        hits = []
        for t in range(len(eval_batch)):
            adapted = learner.adapt(eval_batch.support_x[t], eval_batch.support_y[t])
            with torch.no_grad():
                pred = learner.network(adapted, eval_batch.query_x[t]).argmax(-1)
            hits.append((pred == eval_batch.query_y[t]).float().mean())
        return torch.stack(hits).mean().item()

    before = accuracy()
    for it in range(50):
        gp, _, metrics = learner.meta_gradient(train.sample(8, 1, 5, g), it)
        assert torch.isfinite(metrics["loss"])
        opt.zero_grad()
        for k, p in learner.params.items():
            p.grad = gp[k]
        opt.step()
    after = accuracy()
    assert before < 0.3  # chance is 0.2
    assert after > 0.4, f"5-way 1-shot query accuracy on held-out characters {after:.3f} (before training {before:.3f})"
