"""Sinusoid task family and the TaskBatch container."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.tasks import TaskBatch, TaskDistribution
from metagrad.tasks.sinusoid import DENSE_POINTS, Sinusoid


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fields_of(b: TaskBatch) -> list[torch.Tensor]:
    return [b.support_x, b.support_y, b.query_x, b.query_y, b.info["amplitude"], b.info["phase"]]


# ----- shapes, determinism, RNG hygiene -----------------------------------------------------------------


def test_sample_shapes_and_dtype():
    b = Sinusoid().sample(6, 5, 7, gen(0))
    assert isinstance(b, TaskBatch)
    assert len(b) == 6
    assert b.support_x.shape == (6, 5, 1)
    assert b.support_y.shape == (6, 5, 1)
    assert b.query_x.shape == (6, 7, 1)
    assert b.query_y.shape == (6, 7, 1)
    assert b.info["amplitude"].shape == (6,)
    assert b.info["phase"].shape == (6,)
    for t in fields_of(b):
        assert t.dtype == torch.get_default_dtype()


def test_sample_follows_default_dtype(float64):
    b = Sinusoid().sample(2, 3, 4, gen(0))
    for t in fields_of(b):
        assert t.dtype == torch.float64


def test_sinusoid_is_a_task_distribution():
    assert isinstance(Sinusoid(), TaskDistribution)
    assert Sinusoid().name == "sinusoid"


def test_same_seed_same_tasks_different_seed_different_tasks():
    fam = Sinusoid(noise=0.1)
    a = fam.sample(8, 5, 5, gen(123))
    b = fam.sample(8, 5, 5, gen(123))
    c = fam.sample(8, 5, 5, gen(124))
    for ta, tb, tc in zip(fields_of(a), fields_of(b), fields_of(c), strict=True):
        assert torch.equal(ta, tb)
        assert not torch.equal(ta, tc)


def test_successive_draws_from_one_generator_differ():
    g = gen(0)
    a = Sinusoid().sample(4, 5, 5, g)
    b = Sinusoid().sample(4, 5, 5, g)
    assert not torch.equal(a.support_x, b.support_x)
    assert not torch.equal(a.info["amplitude"], b.info["amplitude"])


@pytest.mark.parametrize("scoring", ["paper", "dense"])
def test_sampling_leaves_global_rng_untouched(scoring):
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    Sinusoid(noise=0.3).sample(16, 10, 10, gen(0), scoring=scoring)
    assert torch.equal(torch.get_rng_state(), state)
    # And the tasks do not depend on the global RNG state.
    torch.manual_seed(1)
    a = Sinusoid(noise=0.3).sample(4, 3, 3, gen(5), scoring=scoring)
    torch.manual_seed(2)
    b = Sinusoid(noise=0.3).sample(4, 3, 3, gen(5), scoring=scoring)
    for ta, tb in zip(fields_of(a), fields_of(b), strict=True):
        assert torch.equal(ta, tb)


# ----- distributions --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amplitude, phase, x_range",
    [((0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)), ((1.0, 2.0), (-1.0, 3.0), (2.0, 10.0))],
)
def test_parameters_in_range_and_roughly_uniform(float64, amplitude, phase, x_range):
    fam = Sinusoid(amplitude=amplitude, phase=phase, x_range=x_range)
    b = fam.sample(4000, 5, 5, gen(7))

    def check(t: torch.Tensor, r: tuple[float, float]) -> None:
        lo, hi = r
        assert t.min() >= lo and t.max() <= hi
        width = hi - lo
        # Uniform: mean at the midpoint (std of the mean ~ width/sqrt(12 n)), variance width^2/12.
        n = t.numel()
        assert abs(t.mean().item() - (lo + hi) / 2) < 5 * width / math.sqrt(12 * n)
        assert abs(t.var().item() - width**2 / 12) < 0.05 * width**2 / 12
        # Both ends are actually reached (not e.g. squeezed into half the range).
        assert t.min() < lo + 0.01 * width and t.max() > hi - 0.01 * width

    check(b.info["amplitude"], amplitude)
    check(b.info["phase"], phase)
    check(b.support_x, x_range)
    check(b.query_x, x_range)


def test_targets_exact_without_noise(float64):
    b = Sinusoid().sample(32, 10, 12, gen(3))
    a, p = b.info["amplitude"], b.info["phase"]
    expect_s = a[:, None, None] * torch.sin(b.support_x - p[:, None, None])
    expect_q = a[:, None, None] * torch.sin(b.query_x - p[:, None, None])
    assert torch.equal(b.support_y, expect_s)
    assert torch.equal(b.query_y, expect_q)


def test_targets_float32_match_formula():
    b = Sinusoid().sample(32, 10, 12, gen(3))
    a, p = b.info["amplitude"].double(), b.info["phase"].double()
    expect = a[:, None, None] * torch.sin(b.support_x.double() - p[:, None, None])
    torch.testing.assert_close(b.support_y.double(), expect, rtol=0, atol=2e-5)


def test_phase_sign_convention(float64):
    # y = A sin(x - phase): a phase shift moves the curve to the right, so y(phase) == 0.
    fam = Sinusoid(amplitude=(2.0, 2.0 + 1e-12), phase=(1.0, 1.0 + 1e-12), x_range=(1.0, 1.0 + 1e-12))
    b = fam.sample(1, 1, 1, gen(0))
    assert abs(b.support_y.item()) < 1e-9
    fam = Sinusoid(amplitude=(2.0, 2.0 + 1e-12), phase=(0.5, 0.5 + 1e-12), x_range=(2.0, 2.0 + 1e-12))
    b = fam.sample(1, 1, 1, gen(0))
    assert b.support_y.item() == pytest.approx(2.0 * math.sin(1.5), abs=1e-9)


@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_noise_residual_std(float64, noise):
    b = Sinusoid(noise=noise).sample(500, 10, 10, gen(11))
    a, p = b.info["amplitude"], b.info["phase"]
    res_s = b.support_y - a[:, None, None] * torch.sin(b.support_x - p[:, None, None])
    res_q = b.query_y - a[:, None, None] * torch.sin(b.query_x - p[:, None, None])
    for r in (res_s, res_q):
        # 5000 samples: relative std error of the std ~ 1 %.
        assert r.std().item() == pytest.approx(noise, rel=0.05)
        assert abs(r.mean().item()) < 5 * noise / math.sqrt(r.numel())


# ----- scoring --------------------------------------------------------------------------------------------


def test_dense_scoring_grid(float64):
    fam = Sinusoid(x_range=(-3.0, 4.0), noise=0.5)
    b = fam.sample(5, 4, 9, gen(0), scoring="dense")
    assert DENSE_POINTS == 100
    assert b.query_x.shape == (5, 100, 1)
    assert b.query_y.shape == (5, 100, 1)
    grid = b.query_x[0, :, 0]
    assert grid[0].item() == -3.0 and grid[-1].item() == 4.0
    torch.testing.assert_close(grid.diff(), torch.full((99,), 7.0 / 99), rtol=0, atol=1e-12)
    for i in range(5):
        assert torch.equal(b.query_x[i], b.query_x[0])
    # The dense queries are noise-free, the support is noisy.
    a, p = b.info["amplitude"], b.info["phase"]
    torch.testing.assert_close(b.query_y, a[:, None, None] * torch.sin(b.query_x - p[:, None, None]))
    res = b.support_y - a[:, None, None] * torch.sin(b.support_x - p[:, None, None])
    assert res.abs().max() > 0.05
    # Tasks still differ in their targets.
    assert not torch.allclose(b.query_y[0], b.query_y[1])


def test_dense_and_paper_share_tasks_and_support(float64):
    fam = Sinusoid()
    d = fam.sample(6, 5, 8, gen(9), scoring="dense")
    p = fam.sample(6, 5, 8, gen(9), scoring="paper")
    assert torch.equal(d.info["amplitude"], p.info["amplitude"])
    assert torch.equal(d.info["phase"], p.info["phase"])
    assert torch.equal(d.support_x, p.support_x)


def test_paper_scoring_queries_drawn_like_support(float64):
    fam = Sinusoid(x_range=(-2.0, 6.0))
    b = fam.sample(2000, 5, 8, gen(4), scoring="paper")
    assert b.query_x.shape == (2000, 8, 1)
    q = b.query_x
    assert q.min() >= -2.0 and q.max() <= 6.0
    assert abs(q.mean().item() - 2.0) < 5 * 8 / math.sqrt(12 * q.numel())
    assert abs(q.var().item() - 64 / 12) < 0.05 * 64 / 12
    # Random, not a shared grid: tasks have different query points, distinct from their support points.
    assert not torch.equal(q[0], q[1])
    assert not torch.equal(q[0, :5], b.support_x[0])
    a, p = b.info["amplitude"], b.info["phase"]
    assert torch.equal(b.query_y, a[:, None, None] * torch.sin(q - p[:, None, None]))


def test_default_scoring_is_paper():
    a = Sinusoid().sample(3, 4, 6, gen(0))
    b = Sinusoid().sample(3, 4, 6, gen(0), scoring="paper")
    assert a.query_x.shape == (3, 6, 1)
    assert torch.equal(a.query_x, b.query_x)


# ----- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"amplitude": (5.0, 0.1)},
        {"amplitude": (1.0, 1.0)},
        {"phase": (0.0, float("inf"))},
        {"phase": (float("nan"), 1.0)},
        {"x_range": (5.0, -5.0)},
        {"x_range": (-float("inf"), 5.0)},
        {"noise": -0.1},
        {"noise": float("nan")},
        {"noise": float("inf")},
    ],
)
def test_invalid_configuration_raises(kwargs):
    with pytest.raises(ValueError):
        Sinusoid(**kwargs)


@pytest.mark.parametrize("batch, shots, queries", [(0, 5, 5), (-1, 5, 5), (4, 0, 5), (4, 5, 0), (4, -2, 5)])
def test_invalid_sizes_raise(batch, shots, queries):
    with pytest.raises(ValueError):
        Sinusoid().sample(batch, shots, queries, gen(0))


def test_invalid_scoring_raises():
    with pytest.raises(ValueError):
        Sinusoid().sample(2, 2, 2, gen(0), scoring="grid")


def test_valid_edge_configuration_accepted():
    fam = Sinusoid(amplitude=(-1.0, 1.0), noise=0.0)
    assert fam.amplitude == (-1.0, 1.0)
    b = fam.sample(1, 1, 1, gen(0))
    assert len(b) == 1


# ----- TaskBatch ------------------------------------------------------------------------------------------


def small_batch() -> TaskBatch:
    return Sinusoid(noise=0.1).sample(6, 3, 4, gen(21))


def test_taskbatch_int_index_keeps_batch_dim():
    b = small_batch()
    one = b[2]
    assert len(one) == 1
    assert one.support_x.shape == (1, 3, 1)
    assert one.query_y.shape == (1, 4, 1)
    assert torch.equal(one.support_x[0], b.support_x[2])
    assert torch.equal(one.support_y[0], b.support_y[2])
    assert torch.equal(one.query_x[0], b.query_x[2])
    assert torch.equal(one.query_y[0], b.query_y[2])
    assert torch.equal(one.info["amplitude"], b.info["amplitude"][2:3])
    assert torch.equal(one.info["phase"], b.info["phase"][2:3])


def test_taskbatch_negative_int_index():
    b = small_batch()
    last = b[-1]
    assert len(last) == 1
    assert torch.equal(last.support_x, b.support_x[5:6])
    assert torch.equal(last.info["amplitude"], b.info["amplitude"][5:6])


def test_taskbatch_slice_index():
    b = small_batch()
    s = b[1:4]
    assert len(s) == 3
    assert torch.equal(s.query_x, b.query_x[1:4])
    assert torch.equal(s.info["phase"], b.info["phase"][1:4])


def test_taskbatch_split_shards_cover_batch():
    b = small_batch()
    shards = [b.split(3, r) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(torch.cat([getattr(s, name) for s in shards]), getattr(b, name))
    assert torch.equal(torch.cat([s.info["amplitude"] for s in shards]), b.info["amplitude"])
    assert torch.equal(shards[1].support_x, b.support_x[2:4])
    assert len(b.split(1, 0)) == 6


def test_taskbatch_split_uneven_shards_cover_the_batch_once():
    b = small_batch()  # 6 tasks on 4 ranks: 2, 2, 1, 1
    shards = [b.split(4, r) for r in range(4)]
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    assert torch.equal(torch.cat([s.support_x for s in shards]), b.support_x)
    with pytest.raises(ValueError, match="at least one"):
        b.split(7, 0)


def test_taskbatch_to_dtype_and_device():
    b = small_batch()
    d = b.to("cpu", torch.float64)
    for t in fields_of(d):
        assert t.dtype == torch.float64
    for t32, t64 in zip(fields_of(b), fields_of(d), strict=True):
        assert torch.equal(t32.double(), t64)
    same = b.to("cpu")
    for t0, t1 in zip(fields_of(b), fields_of(same), strict=True):
        assert t1.dtype == t0.dtype and torch.equal(t0, t1)


def test_taskbatch_to_keeps_integer_tensors():
    x = torch.zeros(2, 3, 1)
    b = TaskBatch(x, x, x, x, {"label": torch.tensor([1, 2])})
    d = b.to("cpu", torch.float64)
    assert d.info["label"].dtype == torch.int64
    assert torch.equal(d.info["label"], torch.tensor([1, 2]))
    assert d.support_x.dtype == torch.float64


def test_taskbatch_int_index_out_of_range_raises():
    b = small_batch()
    with pytest.raises(IndexError):
        b[len(b)]
    with pytest.raises(IndexError):
        b[-len(b) - 1]


def _per_call_sample(fam: Sinusoid, b: int, shots: int, queries: int, g: torch.Generator) -> tuple:
    """The sinusoid sampler as it was written before ``draw``/``assemble``: one generator call per quantity."""

    def uniform(shape, r):
        return torch.rand(shape, generator=g, dtype=torch.float64) * (r[1] - r[0]) + r[0]

    def targets(x, a, p):
        y = a[:, None, None] * torch.sin(x - p[:, None, None])
        return y + fam.noise * torch.randn(y.shape, generator=g, dtype=y.dtype) if fam.noise > 0 else y

    a, p = uniform((b,), fam.amplitude), uniform((b,), fam.phase)
    sx = uniform((b, shots, 1), fam.x_range)
    sy = targets(sx, a, p)
    qx = uniform((b, queries, 1), fam.x_range)
    qy = targets(qx, a, p)
    return tuple(t.to(torch.get_default_dtype()) for t in (sx, sy, qx, qy, a, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise", [0.0, 0.3])
@pytest.mark.parametrize("sizes", [(25, 10, 10), (3, 5, 7), (1, 1, 1)])
def test_draw_and_assemble_are_the_per_call_sampler_bit_for_bit(
    noise: float, sizes: tuple[int, int, int], dtype: torch.dtype
) -> None:
    """The fused training update assembles the tasks from `draw` inside its compiled graph: the tasks, and the
    generator's state after them, must be exactly those of one generator call per quantity (runs, checkpoints and
    published figures keep their tasks). In float64 too, where no rounding to float32 hides a last-bit change."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        _compare_with_per_call_sampler(noise, sizes)
    finally:
        torch.set_default_dtype(old)


def _compare_with_per_call_sampler(noise: float, sizes: tuple[int, int, int]) -> None:
    fam = Sinusoid(amplitude=(0.5, 2.0), x_range=(-3.0, 4.0), noise=noise)
    for seed in range(3):
        g, ref_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        batch = fam.sample(*sizes, g)
        ref = _per_call_sample(fam, *sizes, ref_g)
        got = (batch.support_x, batch.support_y, batch.query_x, batch.query_y, *batch.info.values())
        assert all(torch.equal(x, y) for x, y in zip(got, ref, strict=True))
        assert torch.equal(g.get_state(), ref_g.get_state())
        draw_g = torch.Generator().manual_seed(seed)
        again = fam.assemble(fam.draw(*sizes, draw_g), *sizes)
        assert torch.equal(again.query_y, batch.query_y) and torch.equal(draw_g.get_state(), g.get_state())
