"""``BatchedMatmulOrientation``, the Inductor pass that computes narrow CPU ``bmm`` products transposed: which
products it turns around, that the rewritten graph gives the same numbers in float64, and that a compiled
second-order meta-gradient, where the pass fires, equals the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
from graph_checks import assert_vals_are_real, slow_sums
from torch.fx.experimental.proxy_tensor import make_fx

from metagrad import MAML, MLP, Sinusoid
from metagrad.matmul_orientation import NARROW, BatchedMatmulOrientation, measured_here, turns_around
from metagrad.permuted_reduction import PermutedReduction

F64 = torch.float64


def _turns(m: int, k: int, n: int) -> bool:
    return turns_around(torch.empty(3, m, k), torch.empty(3, k, n))


def test_only_products_with_narrow_rows_and_wide_columns_are_turned_around() -> None:
    assert NARROW == 16
    assert _turns(40, 40, 10) and _turns(16, 3, 15) and _turns(100, 1, 1)
    assert not _turns(40, 40, 16)  # rows as wide as a vector
    assert not _turns(15, 40, 10)  # both narrow: measured no faster
    assert not _turns(10, 40, 40)  # already the fast way round
    assert not _turns(40, 10, 40)
    assert not turns_around(torch.empty(40, 40), torch.empty(40, 10))  # mm, not bmm
    on_meta = torch.empty(3, 40, 40, device="meta"), torch.empty(3, 40, 10, device="meta")
    assert not turns_around(*on_meta)  # not the CPU: oneMKL's quirk only
    half = torch.empty(3, 40, 40, dtype=torch.bfloat16), torch.empty(3, 40, 10, dtype=torch.bfloat16)
    assert not turns_around(*half)  # not measured: oneDNN's kernels
    assert turns_around(torch.empty(3, 40, 40, dtype=F64), torch.empty(3, 40, 10, dtype=F64))


def _bmm_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.bmm.default]


@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_the_pass_rewrites_narrow_products_and_keeps_their_values(a_transposed: bool, b_transposed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, y, w = (torch.randn(s, generator=g, dtype=F64) for s in ((5, 40, 24), (5, 10, 24), (5, 24, 24)))

    def f(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = x.transpose(1, 2).contiguous().transpose(1, 2) if a_transposed else x  # [5, 40, 24], either layout
        b = y.transpose(1, 2) if b_transposed else y.transpose(1, 2).contiguous()  # [5, 24, 10]
        narrow = torch.bmm(a, b)  # [5, 40, 10]: turned around
        return narrow.sin() * 2, torch.bmm(w, w), narrow  # the square one is left alone

    gm = make_fx(f, tracing_mode="fake")(x, y, w)  # nodes carry fake "val"s, as in Inductor's post-grad graph
    assert sum(turns_around(*(a.meta["val"] for a in n.args)) for n in _bmm_nodes(gm)) == 1
    BatchedMatmulOrientation()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    after = _bmm_nodes(gm)
    assert len(after) == 2 and not any(turns_around(*(a.meta["val"] for a in n.args)) for n in after)
    assert_vals_are_real(gm, x, y, w)
    assert BatchedMatmulOrientation().uuid()  # Inductor caches compiled graphs under it (None: no caching)
    got, expected = gm(x, y, w), f(x, y, w)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(not measured_here(), reason="compile() adds the pass on x86 with MKL only")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_second_order_meta_gradient_with_the_pass_equals_eager(monkeypatch) -> None:
    """The default ``compile()`` on the CPU: MAML's float64 meta-gradient on a 20-wide MLP (5 support points per
    task, so the pass fires) equals eager to 1e-12, and the passes did rewrite products and a sum."""
    rewrites: list[int] = []
    original = BatchedMatmulOrientation.__call__

    def narrow_and_all(graph: torch.fx.Graph) -> tuple[int, int]:
        bmms = [n for n in graph.nodes if n.target is torch.ops.aten.bmm.default]
        return sum(turns_around(*(a.meta["val"] for a in n.args)) for n in bmms), len(bmms)

    def counting(self: BatchedMatmulOrientation, graph: torch.fx.Graph) -> None:
        narrow, total = narrow_and_all(graph)
        original(self, graph)
        assert narrow_and_all(graph) == (0, total)
        rewrites.append(narrow)

    monkeypatch.setattr(BatchedMatmulOrientation, "__call__", counting)
    sums: list[tuple[int, int]] = []  # the default chain's other pass, which runs after this one
    summing = PermutedReduction.__call__

    def counting_sums(self: PermutedReduction, graph: torch.fx.Graph) -> None:
        before = slow_sums(graph)
        summing(self, graph)
        sums.append((before, slow_sums(graph)))

    monkeypatch.setattr(PermutedReduction, "__call__", counting_sums)
    torch.manual_seed(0)
    model = MLP(1, [20, 20], 1, "tanh").to(F64)
    eager = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=1)
    compiled = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=1)
    compiled.compile()
    batch = Sinusoid().sample(4, 5, 7, torch.Generator().manual_seed(1)).to("cpu", F64)
    torch._dynamo.reset()
    # A cached compiled graph would skip the pass: compile afresh.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got = compiled.meta_gradient(batch, 0)
    expected = eager.meta_gradient(batch, 0)
    torch._dynamo.reset()
    assert rewrites and sum(rewrites) >= 1
    assert len(sums) == len(rewrites) and sum(b - a for b, a in sums) >= 1  # a transposed sum over the tasks too
    for k in expected[0]:
        torch.testing.assert_close(got[0][k], expected[0][k], rtol=1e-12, atol=1e-12, msg=k)
    assert got[2]["loss"].item() == pytest.approx(expected[2]["loss"].item(), rel=1e-12)
