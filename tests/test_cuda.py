"""Every algorithm on CUDA gives the CPU's numbers; skipped cleanly where no GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch

from metagrad.build import build_learner
from metagrad.cli import main
from metagrad.presets import COMPARE_ALGORITHMS, preset
from metagrad.tasks import OracleSinusoid, Sinusoid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("algorithm", COMPARE_ALGORITHMS)
def test_meta_gradient_matches_cpu(algorithm: str) -> None:
    cfg = preset(algorithm, "tiny")
    cfg.model.hidden = [16, 16]
    cpu = build_learner(cfg).to("cpu", torch.float64)
    gpu = copy.deepcopy(cpu).to("cuda", torch.float64)
    family = OracleSinusoid if algorithm == "oracle" else Sinusoid
    batch = family().sample(6, 5, 5, torch.Generator().manual_seed(3)).to("cpu", torch.float64)
    # Reptile draws its mini-batches from the generator: give both the same stream.
    gp_c, gm_c, m_c = cpu.meta_gradient(batch, 0, torch.Generator().manual_seed(1))
    gp_g, gm_g, m_g = gpu.meta_gradient(batch.to("cuda"), 0, torch.Generator().manual_seed(1))
    for k in gp_c:
        torch.testing.assert_close(gp_g[k].cpu(), gp_c[k], rtol=1e-9, atol=1e-11)
    for k in gm_c:
        torch.testing.assert_close(gm_g[k].cpu(), gm_c[k], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m_g["loss"].cpu(), m_c["loss"])


def test_cli_train_and_eval_on_cuda(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    overrides = ["train.iterations=20", "train.val_every=10", "train.checkpoint_every=10", "model.hidden=[16, 16]"]
    assert main(["train", "--out", str(run), "--device", "cuda", "--no-progress", *overrides]) == 0
    assert main(["eval", str(run), "--device", "cuda", "--tasks", "20", "--steps", "2"]) == 0
    assert "maml on sinusoid" in capsys.readouterr().out


@pytest.mark.parametrize("bn", ["transductive", "per_step"])
def test_conv4_meta_gradient_and_running_statistics_match_cpu(bn: str) -> None:
    from metagrad.config import load_config
    from metagrad.tasks import TaskBatch

    cfg = load_config(None, ["task.name=omniglot", "model.name=conv4", "model.channels=4", "task.image_size=16",
                             "task.ways=2", "algorithm.inner_steps=2", "algorithm.name=maml_enhanced",
                             f"model.bn={bn}"])  # fmt: skip
    cpu = build_learner(cfg).to("cpu", torch.float64)
    gpu = copy.deepcopy(cpu).to("cuda", torch.float64)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(3, 4, 1, 16, 16, generator=g), torch.rand(3, 6, 1, 16, 16, generator=g)
    sy, qy = torch.tensor([[0, 0, 1, 1]] * 3), torch.tensor([[0, 0, 0, 1, 1, 1]] * 3)
    batch = TaskBatch(sx, sy, qx, qy).to("cpu", torch.float64)
    gp_c, _, m_c = cpu.meta_gradient(batch, 0)
    gp_g, _, m_g = gpu.meta_gradient(batch.to("cuda"), 0)
    for k in gp_c:
        torch.testing.assert_close(gp_g[k].cpu(), gp_c[k], rtol=1e-7, atol=1e-9)
    cpu.track_statistics(batch)
    gpu.track_statistics(batch.to("cuda"))
    for k in cpu.buffers:
        torch.testing.assert_close(gpu.buffers[k].cpu(), cpu.buffers[k])


@pytest.mark.parametrize(("patches", "downsample"), [("blocks", "pool"), ("shifts", "pool"), ("blocks", "stride")])
def test_conv4_under_vmap_on_cuda_takes_the_products_and_gives_the_cpus_meta_gradient(
    patches, downsample, monkeypatch
) -> None:
    """On a GPU under vmap every convolution is by default a batched matrix product (cuDNN's grouped convolution
    is slow there), its patches gathered each way: the second-order meta-gradient is the CPU's (float64), for
    the pooling and the strided network."""
    from metagrad.algorithms.maml import MAML
    from metagrad.models import conv4
    from metagrad.tasks import TaskBatch

    calls = []
    gather = conv4._PATCHES[patches]
    monkeypatch.setitem(conv4._PATCHES, patches, lambda x, stride: calls.append(x.shape) or gather(x, stride))
    torch.manual_seed(0)
    # 8 * 9 > 64: off a GPU, convolutions after the first
    model = conv4.Conv4(1, 3, hidden=8, image_size=16, downsample=downsample)
    for conv in model.convs:
        conv.patches = patches
    cpu = MAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy").to("cpu", torch.float64)
    gpu = copy.deepcopy(cpu).to("cuda", torch.float64)
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.randn(3, 3, 1, 16, 16, generator=g), torch.tensor([[0, 1, 2]] * 3),
                      torch.randn(3, 6, 1, 16, 16, generator=g), torch.tensor([[0, 0, 1, 1, 2, 2]] * 3))  # fmt: skip
    batch = batch.to("cpu", torch.float64)
    gp_c = cpu.meta_gradient(batch, 0)[0]
    calls.clear()
    gp_g = gpu.meta_gradient(batch.to("cuda"), 0)[0]
    assert {shape[1] for shape in calls} == {1, 8}  # every layer's input, the first (1 channel) and the others
    for k in gp_c:
        torch.testing.assert_close(gp_g[k].cpu(), gp_c[k], rtol=1e-9, atol=1e-11, msg=k)


def test_cuda_graphs_give_the_eager_meta_gradient_over_several_iterations() -> None:
    """compile(mode="reduce-overhead") replays CUDA graphs: every iteration's gradients must survive the next replay
    (chunks of 2 tasks: three replays per iteration) and equal the eager ones."""
    from metagrad import MAML, MLP

    torch.manual_seed(0)
    eager = MAML(MLP(1, [16, 16], 1), inner_lr=0.01, inner_steps=2, vectorize=2).cuda()
    graphs = copy.deepcopy(eager)
    graphs.compile(mode="reduce-overhead")
    previous = None
    for i in range(4):
        batch = Sinusoid().sample(5, 5, 5, torch.Generator().manual_seed(i)).to("cuda")
        expected = eager.meta_gradient(batch, i)[0]
        graphs.zero_grad()
        graphs.backward(batch, i)
        grads = {k: p.grad for k, p in graphs.model.named_parameters()}  # the tensors themselves, not copies
        for k in expected:
            torch.testing.assert_close(grads[k], expected[k], rtol=1e-4, atol=1e-6)
        if previous is not None:  # the last iteration's gradients survived this iteration's replays
            for k in expected:
                torch.testing.assert_close(previous[0][k], previous[1][k], rtol=1e-4, atol=1e-6)
        previous = (grads, expected)


REPLAYED = ["maml-adam-cosine-clipped", "enhanced-msl", "maml-first-order-first", "reptile-inner-adam", "cavia",
            "metasgd-sgd", "maml-chunks"]  # fmt: skip


@pytest.mark.parametrize("case", REPLAYED)
def test_the_update_replayed_from_real_cuda_graphs_trains_as_the_separate_parts(tmp_path, case: str) -> None:
    """train.cuda_graphs (on by default on a GPU): the eager update captured in a CUDA graph, float64, six steps
    (a changing learning rate, the multi-step loss's weights and its end, first then second order, Reptile's
    draws) against the separate parts on the same GPU."""
    from test_cuda_graph import GRAPHED_CASES, run_both
    from test_fused_update import assert_close_runs, cfg_of

    from metagrad import Trainer

    overrides = [*GRAPHED_CASES[case], "train.device=cuda"]
    graphed = Trainer(cfg_of(*overrides), tmp_path / "graphed")
    separate = Trainer(cfg_of(*overrides, "train.cuda_graphs=false"), tmp_path / "separate")
    run_both(graphed, separate, 6, rtol=1e-10, strict=False)
    graphs = graphed._fused.graphs
    captures = 2 if case in ("maml-first-order-first", "enhanced-msl") else 1  # (a new key mid-run)
    assert graphs.failed is None and graphs.captures == captures and separate._fused is None
    assert_close_runs(graphed, separate, rtol=1e-10)


def test_a_setting_changed_between_real_cuda_graph_replays_is_captured_again(tmp_path) -> None:
    """The inner learning rate is a Python number inside the graph: a stale graph would train with the old one."""
    from test_cuda_graph import change_inner_lr, run_both
    from test_fused_update import assert_close_runs, cfg_of

    from metagrad import Trainer

    overrides = ["train.meta_lr=0.01", "train.device=cuda"]
    graphed = Trainer(cfg_of(*overrides), tmp_path / "graphed")
    separate = Trainer(cfg_of(*overrides, "train.cuda_graphs=false"), tmp_path / "separate")
    run_both(graphed, separate, 3, rtol=1e-10, strict=False)
    for trainer in (graphed, separate):
        change_inner_lr(trainer)
    run_both(graphed, separate, 3, rtol=1e-10, strict=False)
    assert graphed._fused.graphs.captures == 2
    assert_close_runs(graphed, separate, rtol=1e-10)


@pytest.mark.parametrize(("bn", "vectorize"), [("transductive", True), ("per_step", True), ("transductive", False)])
def test_a_conv4_update_replayed_from_cuda_graphs_matches_the_separate_parts(bn: str, vectorize: bool) -> None:
    """The Lake protocol's path (Conv-4 with transductive batch norm, vmap, second order, cross-entropy),
    MAML++'s per-step batch norm, whose running statistics the graph updates in place, and the task loop."""
    from test_cuda_graph import assert_same_conv4, conv4_update_pair

    update, learner, reference = conv4_update_pair(bn, graph=None, device="cuda", vectorize=vectorize)
    assert update.graphs.captures == 1 and update.graphs.failed is None
    assert_same_conv4(learner, reference)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_users_cnn_with_running_statistics_replays_from_real_cuda_graphs(momentum) -> None:
    """A researcher's own CNN (stock BatchNorm2d, InstanceNorm); momentum=None's cumulative average must fold
    without a host read, or the capture fails."""
    from test_cuda_graph import users_cnn_pair

    users_cnn_pair(momentum, graph=None, device="cuda")


def test_the_compiled_update_replayed_from_cuda_graphs_trains_as_the_separate_parts(tmp_path) -> None:
    """train.compile on a GPU: Inductor's update (Triton kernels) captured in metagrad's CUDA graph."""
    from test_cuda_graph import run_both
    from test_fused_update import assert_close_runs, cfg_of

    from metagrad import Trainer

    overrides = ["train.meta_lr=0.01", "train.lr_schedule=cosine", "train.grad_clip=1e-3", "train.device=cuda"]
    graphed = Trainer(cfg_of(*overrides, "train.compile=true"), tmp_path / "graphed")
    separate = Trainer(cfg_of(*overrides, "train.cuda_graphs=false"), tmp_path / "separate")
    # Inductor's Triton kernels round otherwise than eager's: the loss was 6e-10 (relative) from eager's in float64
    # on an H100 (torch 2.11). A graph that replayed a stale learning rate or state would be 1e-5 off or more.
    run_both(graphed, separate, 5, rtol=1e-7, strict=False)
    graphs = graphed._fused.graphs
    assert graphs.failed is None and graphs.captures == 1 and graphed.learner._compiled is not None
    assert_close_runs(graphed, separate, rtol=1e-7)
