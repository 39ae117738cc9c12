"""The Inductor graph passes that ``compile()`` adds on the CPU: ``OuterProducts`` (which products it rewrites,
with the same values), the exact passes together in compiled float32 code (the same bits as without them), and
``GraphPasses``' order and cache key."""

from __future__ import annotations

import pytest
import torch
from graph_checks import assert_vals_are_real, slow_sums
from torch.fx.experimental.proxy_tensor import make_fx

from metagrad.graph_passes import GraphPasses, cpu_passes
from metagrad.matmul_orientation import BatchedMatmulOrientation
from metagrad.outer_products import OuterProducts
from metagrad.permuted_reduction import PermutedReduction

F64 = torch.float64
_mm = torch.ops.aten.mm.default


def _mms(graph: torch.fx.Graph) -> int:
    return sum(n.target is _mm for n in graph.nodes)


def _products(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (
        a @ b,  # [7, 1] @ [1, 5]: rewritten
        a.t().t() @ b * 3,  # the same through views: rewritten
        c[:, :2] @ c.t()[:2],  # two shared indices: left alone
        torch.addmm(c[0], a, b[:, :4]),  # addmm (its bias rounds apart): left alone
        torch.bmm(a[None], b[None]),  # bmm (Inductor decomposes it itself): left alone
        a.half() @ b.half(),  # not float32 or float64: left alone
    )


def test_outer_products_become_element_wise_with_the_same_values() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(s, generator=gen, dtype=F64) for s in ((7, 1), (1, 5), (4, 4)))
    gm = make_fx(_products, tracing_mode="fake")(a, b, c)
    assert _mms(gm.graph) == 4
    OuterProducts()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert _mms(gm.graph) == 2
    assert_vals_are_real(gm, a, b, c)
    for got, expected in zip(gm(a, b, c), _products(a, b, c), strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert torch.equal(got, expected)  # one multiplication per element either way
    assert OuterProducts().uuid()  # Inductor caches compiled graphs under it (None: no caching)


def test_the_passes_leave_symbolic_sizes_alone() -> None:
    """Dynamic shapes: a symbolic size is not compared (a data-dependent one would stop the compile), as the bmm
    pass does. A shared index traced as a static 1 (PyTorch specialises sizes 0 and 1) is still an outer product."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 10, 24, generator=gen), torch.randn(5, 10, 24, generator=gen)
    a, b, c, d = (torch.randn(s, generator=gen) for s in ((7, 1), (1, 5), (7, 3), (3, 5)))

    def f(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor):
        return torch.bmm(x.transpose(1, 2), y).transpose(1, 2).sum(0), a @ b, c @ d

    gm = make_fx(f, tracing_mode="symbolic")(x, y, a, b, c, d)
    assert (_mms(gm.graph), slow_sums(gm.graph)) == (2, 1)
    GraphPasses(OuterProducts(), PermutedReduction())(gm.graph)
    assert (_mms(gm.graph), slow_sums(gm.graph)) == (1, 1)  # c @ d (symbolic shared size) and the sum left alone
    gm.recompile()
    for got, expected in zip(gm(x, y, a, b, c, d), f(x, y, a, b, c, d), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_exact_passes_compile_to_the_same_bits() -> None:
    """The claim of both modules' docstrings, in float32 where rounding shows: Inductor's code with the exact
    passes (all of compile()'s but the bmm pass, which sums in another order) gives what it gives without them,
    and each pass rewrote its part of the graph."""

    def f(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        grad = torch.bmm(x.transpose(1, 2), y).transpose(1, 2)  # a per-task weight gradient as autograd hands it on
        first = p @ w  # a one-wide layer on every point
        return grad.sum(0) * 0.5 + first[:40].t() @ first[40:80]

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(25, 10, 40, generator=gen), torch.randn(25, 10, 40, generator=gen)
    p, w = torch.randn(250, 1, generator=gen), torch.randn(1, 40, generator=gen)
    seen: list[tuple[int, int, int, int]] = []

    class Counting(GraphPasses):
        def __call__(self, graph: torch.fx.Graph) -> None:
            before = (_mms(graph), slow_sums(graph))
            super().__call__(graph)
            seen.append((*before, _mms(graph), slow_sums(graph)))

    options = {"cpp.vec_isa_ok": True}  # (no probe builds: as compile())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on several, Inductor may split the rewritten sum between them (another rounding)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            plain = torch.compile(f, options=options)(x, y, p, w)
            torch._dynamo.reset()
            passes = Counting(OuterProducts(), PermutedReduction())
            rewritten = torch.compile(f, options=options | {"post_grad_custom_post_pass": passes})(x, y, p, w)
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
    assert seen == [(1, 1, 0, 0)]  # the outer product and the transposed sum rewritten (the 40 x 40 one is an addmm)
    assert torch.equal(plain, rewritten)
    torch.testing.assert_close(rewritten, f(x, y, p, w), rtol=1e-5, atol=1e-4)


def test_graph_passes_run_in_order_and_key_the_cache_on_every_pass() -> None:
    calls: list[str] = []

    class Named(PermutedReduction):
        def __init__(self, name: str, key: bytes | None) -> None:
            self.name, self.key = name, key

        def __call__(self, graph: torch.fx.Graph) -> None:
            calls.append(self.name)

        def uuid(self) -> bytes | None:
            return self.key

    chain = GraphPasses(Named("a", b"1"), Named("b", b"2"))
    chain(torch.fx.Graph())
    assert calls == ["a", "b"]
    key = chain.uuid()
    assert key is not None and key == GraphPasses(Named("a", b"1"), Named("b", b"2")).uuid()
    assert key != GraphPasses(Named("b", b"2"), Named("a", b"1")).uuid()  # another order is another graph
    assert key != GraphPasses(Named("a", b"1"), Named("b", b"3")).uuid()  # a changed pass compiles afresh
    assert GraphPasses(Named("a", b"1"), Named("b", None)).uuid() is None  # Inductor then does not cache
    default = cpu_passes()
    kinds = [type(p) for p in default.passes]
    # The permuted sum last: it also sees the products the bmm pass turned around (where it is measured).
    assert kinds in ([OuterProducts, BatchedMatmulOrientation, PermutedReduction], [PermutedReduction])
    assert default.uuid()
