"""Conv-4's per-step batch norm (MAML++ BNWB + BNRS): formulas, gradients, running statistics, isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metagrad.algorithms import MAML, MAMLEnhanced
from metagrad.config import load_config
from metagrad.errors import ConfigError
from metagrad.evaluate import set_bn_statistics
from metagrad.models.conv4 import Conv4, PerStepBatchNorm2d
from metagrad.tasks import TaskBatch

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def tiny_batch(tasks: int = 3, ways: int = 2, shots: int = 2, queries: int = 3, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, ways * shots, 1, 16, 16, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, 16, 16, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone()
    return TaskBatch(sx, sy, qx, qy)


def per_step_learner(steps: int = 2, cls=MAML, **kwargs) -> MAML:
    torch.manual_seed(0)
    model = Conv4(ways=2, hidden=3, image_size=16, bn="per_step", steps=steps)
    with torch.no_grad():  # distinct rows, so that using the wrong step shows
        for m in model.modules():
            if isinstance(m, PerStepBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    if cls is MAML:
        kwargs.setdefault("inner_lr", 0.3)
    return cls(model, inner_steps=steps, loss="cross_entropy", **kwargs)


def test_per_step_bn_matches_batch_norm_row_by_row_and_clamps_past_the_last_step():
    torch.manual_seed(0)
    bn = PerStepBatchNorm2d(4, steps=2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    for step, row in [(0, 0), (1, 1), (2, 2), (7, 2)]:
        expected = F.batch_norm(x, None, None, bn.weight[row], bn.bias[row], training=True, eps=bn.eps)
        torch.testing.assert_close(bn(x, step), expected, rtol=1e-5, atol=1e-5)
    # Running mode: a fixed affine map of each image on its own.
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    expected = F.batch_norm(x, bn.running_mean[1], bn.running_var[1], bn.weight[1], bn.bias[1], training=False)
    torch.testing.assert_close(bn(x, 1, "running"), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn(x[:1], 1, "running"), expected[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="statistics"):
        bn(x, 1, "runing")


def test_tracking_folds_batch_statistics_with_momentum():
    bn = PerStepBatchNorm2d(3, steps=1, momentum=0.25)
    x = torch.randn(5, 3, 4, 4) * 2 + 3
    bn(x, 1)
    bn(x, 1, "running", track=True)  # tracking folds batch statistics only
    assert torch.equal(bn.running_mean, torch.zeros(2, 3))  # never without tracking
    bn(x, 1, track=True)
    torch.testing.assert_close(bn.running_mean[1], 0.25 * x.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var[1], 0.75 + 0.25 * x.transpose(0, 1).reshape(3, -1).var(1))
    assert torch.equal(bn.running_mean[0], torch.zeros(3)) and torch.equal(bn.running_var[0], torch.ones(3))


def test_per_step_bn_is_meta_learned_not_adapted():
    learner = per_step_learner(cls=MAMLEnhanced)
    assert learner.per_step
    assert not any(n.startswith("norms.") for n in learner.fast)
    assert not any("norms." in k for k in learner.meta_state)  # no rates or curvature for BN rows
    assert {n for n in learner.params if n.startswith("norms.")} == {f"norms.{i}.{p}" for i in range(4) for p in
                                                                     ("weight", "bias")}  # fmt: skip
    gp, gm, metrics = learner.meta_gradient(tiny_batch(), 0)
    for i in range(4):  # every row of every BN layer is trained: support at steps 0, 1, query at 1 and 2
        assert (gp[f"norms.{i}.weight"].abs().sum(1) > 0).all()
    assert torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_meta_gradient_vmap_equals_loop(first_order):
    # float64: the conv biases' exact gradient is 0 (batch norm cancels them), float32 noise is ~1e-6
    learner = per_step_learner(first_order=first_order).to("cpu", torch.float64)
    batch = tiny_batch().to("cpu", torch.float64)
    gv, _, mv = learner.meta_gradient(batch, 0)
    learner.vectorize = False
    gl, _, ml = learner.meta_gradient(batch, 0)
    for k in gv:
        torch.testing.assert_close(gv[k], gl[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mv["loss"], ml["loss"])


def test_per_step_meta_gradient_matches_hand_unrolled_maml_and_finite_differences(float64):
    """The learner's meta-gradient equals MAML unrolled by hand with row s at step s (support) and row s + 1
    for the query after s + 1 steps, and a central finite difference in float64 along a random direction."""
    learner = per_step_learner(steps=2).to("cpu", torch.float64)
    batch = tiny_batch(tasks=1).to("cpu", torch.float64)
    sx, sy, qx, qy = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]

    def loss(p, x, y, step):
        return F.cross_entropy(torch.func.functional_call(learner.model, (p, dict(learner.buffers)), (x, step)), y)

    def meta(p):
        fast = [k for k in p if not k.startswith("norms.")]
        for s in range(2):
            g = torch.func.grad(lambda f, p=p, s=s: loss({**p, **f}, sx, sy, s))({k: p[k] for k in fast})
            p = {**p, **{k: p[k] - 0.3 * g[k] for k in fast}}
        return loss(p, qx, qy, 2)

    params = {k: v.clone() for k, v in learner.params.items()}
    gp, _, metrics = learner.meta_gradient(batch, 0)
    torch.testing.assert_close(metrics["loss"], meta(params))
    hand = torch.func.grad(meta)(params)
    for k in hand:
        torch.testing.assert_close(gp[k], hand[k])
    torch.manual_seed(1)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    eps = 1e-6
    fd = (meta({k: params[k] + eps * v[k] for k in params}) - meta({k: params[k] - eps * v[k] for k in params})) / (
        2 * eps
    )
    torch.testing.assert_close(sum((gp[k] * v[k]).sum() for k in gp), fd, rtol=1e-6, atol=1e-8)


def test_running_statistics_track_training_and_never_change_in_evaluation():
    learner = per_step_learner()
    batch = tiny_batch(tasks=6)
    before = {k: v.clone() for k, v in learner.buffers.items()}
    learner.meta_gradient(batch, 0)
    learner.adaptation_curve(batch, 3)
    assert all(torch.equal(before[k], v) for k, v in learner.buffers.items())  # nothing but tracking writes
    learner.track_statistics(batch, tasks=2)
    changed = {k: v.clone() for k, v in learner.buffers.items()}
    for i in range(4):  # every step's row moved (support at 0 and 1, query at 2)
        assert (changed[f"norms.{i}.running_mean"] != 0).any(1).all()
    # Hand check of the first layer, step 0: two EMA updates with the two tasks' support statistics.
    w, b = learner.params["convs.0.weight"], learner.params["convs.0.bias"]
    m = torch.zeros(3)
    for t in range(2):
        with torch.no_grad():
            m = 0.9 * m + 0.1 * F.conv2d(batch.support_x[t], w, b, padding=1).mean((0, 2, 3))
    torch.testing.assert_close(changed["norms.0.running_mean"][0], m)
    # Evaluating in either mode, twice, leaves them as they are and gives the same numbers: no leaks.
    for mode in ("batch", "running"):
        set_bn_statistics(learner, mode)
        first = learner.adaptation_curve(batch, 3)
        second = learner.adaptation_curve(batch, 3)
        assert torch.equal(first, second)
        assert all(torch.equal(changed[k], v) for k, v in learner.buffers.items())


def test_running_statistics_classify_each_query_on_its_own():
    learner = per_step_learner()
    batch = tiny_batch(tasks=4)
    for _ in range(3):
        learner.track_statistics(batch)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    adapted = learner.adapt(sx, sy)
    set_bn_statistics(learner, "running")
    alone = torch.cat([learner.predict(qx[i : i + 1], adapted) for i in range(len(qx))])
    torch.testing.assert_close(learner.predict(qx, adapted), alone, rtol=1e-5, atol=1e-6)
    # Adaptation still normalises the support set with its own statistics, as in training.
    assert all(torch.equal(a, b) for a, b in zip(adapted.values(), learner.adapt(sx, sy).values(), strict=True))
    set_bn_statistics(learner, "batch")  # transductive: a query's logits depend on the others
    assert not torch.allclose(learner.predict(qx, adapted), alone, atol=1e-4)
    with pytest.raises(ValueError, match="per-step"):
        Conv4()(torch.rand(2, 1, 28, 28), 0, "running")
    with pytest.raises(ConfigError, match="per_step"):
        set_bn_statistics(MAML(Conv4(), loss="cross_entropy"), "running")


def test_config_rules_for_per_step_bn():
    base = ["task.name=omniglot", "model.name=conv4", "model.bn=per_step"]
    assert load_config(None, base).model.bn == "per_step"
    from metagrad.build import build_learner

    with pytest.raises(ConfigError, match="reptile has none"):  # found when the learner is built
        build_learner(load_config(None, [*base, "algorithm.name=reptile"]))
    with pytest.raises(ConfigError, match="did you mean 'per_step'"):
        load_config(None, ["task.name=omniglot", "model.name=conv4", "model.bn=perstep"])


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot data not found at {OMNIGLOT}")
def test_per_step_run_trains_checkpoints_and_evaluates_in_both_modes(tmp_path, capsys):
    import json

    from metagrad.cli import main
    from metagrad.run import load_learner

    run = tmp_path / "ps"
    cfg = ["task.name=omniglot", "model.name=conv4", "model.channels=4", f"task.data={OMNIGLOT}", "train.threads=1",
           "train.iterations=3", "train.meta_batch=2", "train.val_every=3", "train.checkpoint_every=3",
           "train.val_tasks=2", "algorithm.inner_lr=0.4", "algorithm.inner_steps=2", "model.bn=per_step"]  # fmt: skip
    assert main(["train", "--out", str(run), "--no-progress", *cfg]) == 0
    _, learner, _ = load_learner(run)
    assert learner.per_step and (learner.buffers["norms.0.running_mean"] != 0).all()  # tracked and saved
    results = {}
    for mode in ("batch", "running"):
        out = tmp_path / f"{mode}.json"
        argv = ["eval", str(run), "--tasks", "4", "--steps", "2", "--shots", "1", "--bn-statistics", mode]
        assert main([*argv, "--json", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
        assert results[mode]["bn_statistics"] == mode
    assert "running BN statistics" in capsys.readouterr().out
    assert results["batch"]["results"][0]["accuracy"] != results["running"]["results"][0]["accuracy"]
