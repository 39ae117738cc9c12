"""ResNet-12 and MAML's 84x84 Conv-4: shapes, registration, an exact float64 meta-gradient through ResNet-12
(vmap == loop == central difference), DropBlock under vmap, and MAML / MAML Enhanced training on a generated
84x84 RGB image set through the command line."""

from __future__ import annotations

import json

import pytest
import torch
from meta_gradcheck import (
    assert_every_tensor_matches_central_differences,
    assert_first_order_matches_frozen_inner_gradients,
    assert_vmap_equals_loop,
)
from test_images_sets import make_split_folders

from metagrad.algorithms import MAML, MAMLEnhanced
from metagrad.cli import main
from metagrad.models import Conv4MiniImageNet, ResNet12
from metagrad.models.resnet12 import DropBlock
from metagrad.registry import registered
from metagrad.tasks import TaskBatch

F64 = torch.float64


def test_resnet12_is_the_standard_network_and_registered():
    assert {"resnet12", "conv4_miniimagenet", "conv4"} <= set(registered("model"))
    net = ResNet12(in_channels=3, ways=5)
    widths = [b.conv1.out_channels for b in net.blocks]
    assert widths == [64, 160, 320, 640] and net.head.in_features == 640
    assert 12.0e6 < sum(p.numel() for p in net.parameters()) < 12.6e6  # MetaOptNet's ResNet-12 has 12.4 M
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert not list(net.buffers())  # no running statistics by default: every batch is normalised by itself
    assert ResNet12(1, 5, (4, 4, 4, 4), running_statistics=True)(torch.randn(2, 1, 16, 16)).shape == (2, 5)
    maml = Conv4MiniImageNet(in_channels=3, ways=5, image_size=84)
    assert maml.hidden == 32 and maml.head.in_features == 32 * 5 * 5  # MAML's miniImageNet network


def test_dropblock_drops_blocks_in_training_only():
    drop = DropBlock(0.3, block_size=3)
    x = torch.ones(4, 2, 10, 10)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean()
    assert 0.15 < dropped < 0.45 and torch.allclose(y.mean(), torch.tensor(1.0), atol=0.1)
    zero = (y[0, 0] == 0).nonzero()
    assert len(zero) == 0 or len(zero) >= 3  # whole blocks, not single units
    drop.eval()
    assert torch.equal(drop(x), x)


def _batch(tasks: int = 3, ways: int = 2, shots: int = 2, queries: int = 2, side: int = 16) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, ways * shots, 3, side, side, generator=g, dtype=F64)
    qx = torch.rand(tasks, ways * queries, 3, side, side, generator=g, dtype=F64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone()
    return TaskBatch(sx, sy, qx, qy)


ALGORITHMS = {
    "maml": lambda m: MAML(m, inner_lr=0.3, inner_steps=2, loss="cross_entropy"),
    "maml_enhanced": lambda m: MAMLEnhanced(m, inner_lr=0.3, inner_steps=2, loss="cross_entropy"),
}


def _learner(algorithm: str, vectorize: bool, **options):
    torch.manual_seed(0)
    learner = ALGORITHMS[algorithm](ResNet12(3, 2, (3, 4, 4, 5), **options))
    learner.vectorize = vectorize
    learner.to("cpu", F64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # batch-norm scales away from 1, so that every factor of the derivative matters
        for name, p in learner.model.named_parameters():
            if ".bn" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5, generator=g)
    for k, v in learner.meta_state.items():
        learner.meta_state[k] = v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64)
    return learner


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resnet12_meta_gradient_vmap_equals_loop_equals_finite_difference(algorithm, first_order):
    """The meta-gradient through ResNet-12's convolutions, shortcuts and batch norms, in float64: vmap == loop,
    and every tensor (MAML Enhanced's 133 rule tensors too) against its own central difference, second order
    with the whole inner loop differentiated, first order with the inner gradients frozen."""
    batch = _batch()
    vec, loop = _learner(algorithm, True), _learner(algorithm, False)
    for learner in (vec, loop):
        learner.first_order = first_order
    gp_v, gm_v, m_v = vec.meta_gradient(batch, 0)
    gp_l, gm_l, _ = loop.meta_gradient(batch, 0)
    # Every entry, relative to the largest (PyTorch's BN kernel under vmap was off by up to 1 %).
    assert_vmap_equals_loop({**gp_v, **gm_v}, {**gp_l, **gm_l})
    assert loop.schedule(0)[1] == first_order
    if first_order:
        assert_first_order_matches_frozen_inner_gradients(loop, batch, gp_v, gm_v)
    else:
        # One unit direction in each tensor: a 1e-4 error in any one tensor fails (one direction through all of
        # them let MAML Enhanced's through, one tensor at a time).
        assert_every_tensor_matches_central_differences(loop, batch, gp_v, gm_v)


@pytest.mark.parametrize("first_order", [False, True])
def test_resnet12_with_running_statistics_first_and_second_order(first_order):
    """Batch norms that track running statistics (which the meta-step reads and never writes): vmap == loop, and
    every tensor's central difference (first order with the inner gradients frozen)."""
    batch = _batch()
    vec = _learner("maml", True, running_statistics=True)
    loop = _learner("maml", False, running_statistics=True)
    assert loop.tracks_statistics
    for learner in (vec, loop):
        learner.first_order = first_order
    before = {k: v.clone() for k, v in loop.model.named_buffers()}
    gp_v, gm_v, _ = vec.meta_gradient(batch, 0)
    gp_l, gm_l, _ = loop.meta_gradient(batch, 0)
    assert all(torch.equal(v, before[k]) for k, v in loop.model.named_buffers())
    assert_vmap_equals_loop({**gp_v, **gm_v}, {**gp_l, **gm_l})
    if first_order:
        assert_first_order_matches_frozen_inner_gradients(loop, batch, gp_v, gm_v)
    else:
        assert_every_tensor_matches_central_differences(loop, batch, gp_v, gm_v)


def test_resnet12_with_dropblock_draws_per_task_masks_from_the_generator():
    batch = _batch()
    learner = _learner("maml", True, dropblock=0.2, dropblock_size=2)
    learner.train()
    a = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(5))[0]
    b = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(5))[0]
    c = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(6))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible from the trainer's generator
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and random
    learner.eval()
    d = learner.meta_gradient(batch, 0)[0]
    e = learner.meta_gradient(batch, 0)[0]
    assert all(torch.equal(d[k], e[k]) for k in d)  # off outside training


def test_resnet12_with_dropblock_meta_gradient_equals_central_differences_with_the_same_masks():
    """Second-order MAML through DropBlock in training: with the step's randomness seeded, every tensor's
    meta-gradient equals its central difference taken with the same blocks dropped."""
    batch = _batch()
    learner = _learner("maml", False, dropblock=0.2, dropblock_size=2)
    learner.train()
    assert learner.random
    gp, gm, _ = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(5))

    def same_blocks():
        return learner._task_randomness(torch.Generator().manual_seed(5), torch.device("cpu"))

    assert_every_tensor_matches_central_differences(learner, batch, gp, gm, randomness=same_blocks)


@pytest.mark.parametrize(
    "model, algorithm",
    [
        (["model.name=resnet12", "model.widths=[4, 8, 8, 16]"], "maml"),
        (["model.name=resnet12", "model.widths=[4, 8, 8, 16]", "model.dropblock=0.1"], "maml_enhanced"),
        (["model.name=conv4_miniimagenet"], "maml"),
        (["model.name=conv4_miniimagenet"], "maml_enhanced"),
    ],
)
def test_train_and_evaluate_on_a_generated_84x84_rgb_set(model, algorithm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    data = make_split_folders(tmp_path / "mini", per_split=(3, 3, 3), per_class=4)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--no-progress", "task.name=images", f"task.data={data}", "task.ways=3",
            "task.shots=1", "task.queries=2", "task.workers=1", "task.augment=true", *model,
            f"algorithm.name={algorithm}", "algorithm.inner_steps=1", "train.iterations=2", "train.meta_batch=2",
            "train.val_every=2", "train.val_tasks=2", "train.log_every=1", "train.checkpoint_every=2",
            "train.threads=1"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((run / "run.json").read_text())
    task = record["config"]["task"]
    assert len(task["mean"]) == 3 and len(task["std"]) == 3  # the normalisation is stored in the run
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    capsys.readouterr()
    assert main(["eval", str(run), "--shots", "1", "--steps", "1", "--tasks", "4"]) == 0
    assert "accuracy" in capsys.readouterr().out.lower()
