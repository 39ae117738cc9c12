"""``compile(mode=...)``: the CUDA-graph modes copy every compiled call's outputs out of the graph's static memory
(tested with a stand-in that overwrites its outputs on every call, as a graph replay does), and the mode reaches
the learner from ``train.compile_mode``; the options ``compile()`` chooses on the CPU, and Conv-4's compiled
meta-step against the eager one."""

from __future__ import annotations

import pytest
import torch

from metagrad import MAML, MLP, Conv4, Reptile, Sinusoid, matmul_orientation
from metagrad.algorithms import base
from metagrad.config import load_config
from metagrad.errors import ConfigError
from metagrad.graph_passes import GraphPasses
from metagrad.matmul_orientation import BatchedMatmulOrientation
from metagrad.outer_products import OuterProducts
from metagrad.permuted_reduction import PermutedReduction
from metagrad.tasks import TaskBatch


def _batch(tasks: int = 5):
    return Sinusoid().sample(tasks, 5, 5, torch.Generator().manual_seed(0))


def _static_replay(step):
    """Like a CUDA graph: every call writes its outputs into the same tensors and returns those."""
    static: dict = {}

    def replay(*args):
        out = step(*args)
        trees = []
        for i, tree in enumerate(out):
            for k, v in tree.items():
                static.setdefault((i, k), torch.empty_like(v)).copy_(v)
            trees.append({k: static[(i, k)] for k in tree})
        return tuple(trees)

    return replay


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_graph_outputs_are_copied_before_the_next_replay(graphs: bool) -> None:
    torch.manual_seed(0)
    learner = MAML(MLP(1, [8], 1), inner_lr=0.1, inner_steps=1, vectorize=2)  # 5 tasks: 3 chunks, 3 replays
    expected = learner.meta_gradient(_batch())[0]
    learner._compiled, learner._cuda_graphs = _static_replay(learner._chunk_gradient), graphs
    learner._on_cuda = lambda params: True  # the stand-in plays a GPU's graph replays on the CPU
    first = learner.meta_gradient(_batch())[0]
    learner.meta_gradient(_batch(2))  # the next iteration's replay must not reach the first one's gradients
    same = all(torch.allclose(first[k], expected[k], rtol=1e-6, atol=1e-8) for k in expected)
    assert same is graphs  # without the copies, later chunks overwrite earlier ones: the stand-in is a real test


def test_reptile_copies_its_compiled_outputs_too() -> None:
    torch.manual_seed(0)
    learner = Reptile(MLP(1, [8], 1), inner_lr=0.01, inner_steps=2)
    expected = learner.meta_gradient(_batch(), 0, torch.Generator().manual_seed(1))[0]
    learner.compile(mode="reduce-overhead")
    learner._compiled, learner._on_cuda = _static_replay(learner._reptile_step), lambda params: True
    first = learner.meta_gradient(_batch(), 0, torch.Generator().manual_seed(1))[0]
    learner.meta_gradient(_batch(2), 1, torch.Generator().manual_seed(2))
    for k in expected:
        torch.testing.assert_close(first[k], expected[k])


def test_reduce_overhead_compiles_on_the_cpu_and_matches_eager() -> None:
    torch.manual_seed(0)
    eager = MAML(MLP(1, [8], 1), inner_lr=0.1, inner_steps=1)
    torch.manual_seed(0)
    compiled = MAML(MLP(1, [8], 1), inner_lr=0.1, inner_steps=1)
    compiled.compile(mode="reduce-overhead")
    assert compiled._cuda_graphs and not compiled._on_cuda(dict(compiled.params))  # on the CPU: nothing to copy
    expected, got = eager.meta_gradient(_batch())[0], compiled.meta_gradient(_batch())[0]
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_compile_mode_is_a_checked_train_key() -> None:
    assert load_config(None, ["train.compile_mode=reduce-overhead"]).train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(None, ["train.compile_mode=fastest"])


def test_compile_on_the_cpu_adds_the_graph_passes_and_cpp_wrapper_and_keeps_every_explicit_choice(monkeypatch) -> None:
    """On the CPU the graph passes (the narrow-bmm pass where measured, the permuted sum) join every Inductor
    compile without options of the caller's (a mode as the options it stands for), and the C++ wrapper the default
    one (faster to compile and to run on the sinusoid step, docs/results.md). Options, another backend or another
    device keep PyTorch's behaviour."""
    seen: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", None)  # TORCHINDUCTOR_VEC_ISA_OK unset
    monkeypatch.setattr(matmul_orientation, "measured_here", lambda: True)  # x86 with MKL, as on CI
    learner = MAML(MLP(1, [8], 1), inner_lr=0.1, inner_steps=1)
    for kwargs in ({}, {"fullgraph": True}, {"mode": "reduce-overhead"}, {"mode": "max-autotune-no-cudagraphs"},
                   {"options": {"max_autotune": True}}, {"backend": "aot_eager"}):  # fmt: skip
        learner.compile(**kwargs)
    for added in seen[:4]:  # fresh passes in each, and no instruction-set probes
        passes = added["options"].pop("post_grad_custom_post_pass")
        assert isinstance(passes, GraphPasses)
        assert [type(p) for p in passes.passes] == [OuterProducts, BatchedMatmulOrientation, PermutedReduction]
        assert added["options"].pop("cpp.vec_isa_ok") is True
    wrapper = {"cpp_wrapper": True, "memory_planning": True}
    assert seen == [
        {"options": wrapper},
        {"fullgraph": True, "options": wrapper},
        {"options": torch._inductor.list_mode_options("reduce-overhead")},
        {"options": torch._inductor.list_mode_options("max-autotune-no-cudagraphs")},
        {"options": {"max_autotune": True}},
        {"backend": "aot_eager"},
    ]
    assert learner._cuda_graphs is False  # the last call's; a CUDA-graph mode is still recognised:
    learner.compile(mode="reduce-overhead")
    assert learner._cuda_graphs is True
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", False)  # the user's own choice is kept
    learner.compile()
    assert "cpp.vec_isa_ok" not in seen[-1]["options"]
    monkeypatch.setattr(matmul_orientation, "measured_here", lambda: False)  # e.g. aarch64: no bmm pass
    learner.compile()
    passes = seen[-1]["options"].pop("post_grad_custom_post_pass")
    assert [type(p) for p in passes.passes] == [PermutedReduction]  # the oneMKL ones where they were measured
    assert seen[-1] == {"options": wrapper}
    assert base._CPU_INDUCTOR == wrapper  # copied, not mutated by the options added to it
    # A network that convolves gets no memory planning: Inductor's planner overflowed Python's recursion limit on
    # Conv-4's five-step meta-step.
    MAML(Conv4(1, 5, 4, 28), inner_lr=0.1, inner_steps=1).compile()
    seen[-1]["options"].pop("post_grad_custom_post_pass")
    assert seen[-1] == {"options": {"cpp_wrapper": True}}
    learner.to("meta")  # any device other than the CPU: PyTorch's defaults
    learner.compile()
    assert seen[-1] == {}
    learner.compile(mode="max-autotune")
    assert seen[-1] == {"mode": "max-autotune"} and learner._cuda_graphs


def test_every_compiled_learner_in_a_process_gets_its_own_graph_beyond_dynamos_recompile_limit(monkeypatch) -> None:
    """Dynamo keeps at most ``recompile_limit`` (8) graphs per code object; a learner's compile() runs a copy of the
    meta-step's code, so the ninth and later learners in a process (a sweep) are compiled too, not run eagerly.
    The limit is lowered to 2 here to keep the test short; the mechanism is the same."""
    from torch._dynamo.utils import counters

    batch = _batch(3)
    limit = 2
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", limit)
    graphs = []
    for _ in range(limit + 2):
        learner = MAML(MLP(1, [4], 1), inner_lr=0.1, inner_steps=1)
        learner.compile(backend="eager")
        before = counters["stats"]["unique_graphs"]
        learner.meta_gradient(batch)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1] * (limit + 2)


def test_a_deep_copy_of_a_compiled_learner_compiles_its_own_step_and_reads_its_own_settings() -> None:
    import copy

    batch = _batch(3)
    learner = MAML(MLP(1, [4], 1), inner_lr=0.1, inner_steps=1)
    learner.compile(backend="eager")
    twin = copy.deepcopy(learner)
    assert twin._compiled is not None and twin._compiled is not learner._compiled
    assert twin._compile_options == {"backend": "eager"}
    twin.inner_steps = 3  # the copy's own setting, which a step bound to the original would not see
    eager = copy.deepcopy(twin)
    eager._compiled = None
    got, expected = twin.meta_gradient(batch), eager.meta_gradient(batch)
    for k in expected[0]:
        torch.testing.assert_close(got[0][k], expected[0][k], rtol=1e-5, atol=1e-6)
    assert learner.inner_steps == 1
    assert all(p is not q for p, q in zip(learner.parameters(), twin.parameters(), strict=True))
    shallow = copy.copy(learner)  # shares the network, not the compiled step
    assert shallow._compiled is not None and shallow._compiled is not learner._compiled
    shallow.inner_steps = 3
    for k, v in shallow.meta_gradient(batch)[0].items():
        torch.testing.assert_close(v, expected[0][k], rtol=1e-5, atol=1e-6)


def test_one_learners_shapes_do_not_make_anothers_first_graph_dynamic() -> None:
    """Dynamo remembers which sizes changed by the code's file, line and name: each learner's copy of the
    meta-step has a name of its own, so a new learner's first graph is static whatever others ran."""
    dynamic: list[bool] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        dynamic.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    first = MAML(MLP(1, [4], 1), inner_lr=0.1, inner_steps=1)
    first.compile(backend=backend)
    first.meta_gradient(_batch(3))
    first.meta_gradient(_batch(5))  # a second size: this learner's step recompiles with dynamic sizes
    assert dynamic == [False, True]
    second = MAML(MLP(1, [4], 1), inner_lr=0.1, inner_steps=1)
    second.compile(backend=backend)
    second.meta_gradient(_batch(3))
    assert dynamic == [False, True, False]


def test_compiled_conv4_meta_gradient_is_the_eager_one_to_second_order(float64) -> None:
    """Conv-4's compiled second-order meta-step on the CPU (the strided network and the task loop, as
    ``configs/omniglot/maml_20way_strided.toml`` compiles it) gives the eager meta-gradient:
    float64, every tensor, to 1e-10 of its largest entry, in one graph. Traced, the network takes the form that is
    right under ``vmap`` too (batch norm's composite statistics, metagrad.transforms.under_vmap); eagerly, PyTorch's
    fused kernels, which tests/test_norm.py checks against vmap and central differences. The backend runs
    Dynamo's trace, functionalisation, Inductor's decompositions and the min-cut partition of the joint graph
    eagerly. It leaves out Inductor's code generation and metagrad's passes (tests/test_graph_passes.py): their C++
    build of this graph took about a minute on one core here (this test with Inductor's backend), too long for
    this suite; Inductor's kernels are checked on the MLP (tests/test_fused_update.py)."""
    import copy

    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, downsample="stride")
    g = torch.Generator().manual_seed(1)
    images = [1 - 0.3 * torch.rand(2, n, 1, 16, 16, generator=g) for n in (3, 6)]  # bright, as Omniglot's
    batch = TaskBatch(images[0], torch.tensor([[0, 1, 2]] * 2), images[1], torch.tensor([[0, 0, 1, 1, 2, 2]] * 2))
    eager = MAML(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy")  # (more steps: the same graph again)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager_decomp_partition", fullgraph=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    expected, got = eager.meta_gradient(batch), compiled.meta_gradient(batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # one graph, compiled
    for k, v in expected[0].items():
        scale = v.abs().max().item()
        assert scale > 1e-6 or k.endswith(".bias") and "conv" in k, k  # (batch norm makes conv biases irrelevant)
        torch.testing.assert_close(got[0][k], v, rtol=0, atol=1e-10 * max(scale, 1e-3), msg=k)
    torch.testing.assert_close(got[2]["loss"], expected[2]["loss"], rtol=1e-12, atol=0)
