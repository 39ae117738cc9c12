"""``OuterProducts``, the Inductor pass that computes CPU ``mm``/``bmm`` products over a shared index of size 1 as
element-wise products: which products it rewrites, and that the rewritten graph gives the same bits (each output
element is one multiplication)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from metagrad.outer_products import OuterProducts, is_outer_product

_aten = torch.ops.aten


def test_only_products_over_one_shared_index_are_rewritten() -> None:
    assert is_outer_product(torch.empty(250, 1), torch.empty(1, 40))
    assert is_outer_product(torch.empty(25, 10, 1), torch.empty(25, 1, 40))
    assert is_outer_product(torch.empty(3, 1, dtype=torch.float64), torch.empty(1, 1, dtype=torch.float64))
    assert not is_outer_product(torch.empty(250, 2), torch.empty(2, 40))  # a sum of two products
    assert not is_outer_product(torch.empty(250, 1), torch.empty(3, 1, 40))  # mm and bmm mixed
    assert not is_outer_product(torch.empty(250, 1, dtype=torch.bfloat16), torch.empty(1, 40, dtype=torch.bfloat16))
    assert not is_outer_product(torch.empty(250, 1), torch.empty(1, 40, dtype=torch.float64))
    assert not is_outer_product(torch.empty(250, 1, device="meta"), torch.empty(1, 40, device="meta"))


def _products(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target in (_aten.mm.default, _aten.bmm.default, _aten.addmm.default)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_pass_rewrites_outer_products_and_keeps_every_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, v, bias = (torch.randn(s, generator=g, dtype=dtype) for s in ((250, 1), (40, 1), (25, 10, 40), (40,)))

    def f(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.mm(x, w.t())  # [250, 1] @ [1, 40]: the first layer of a 1-wide MLP, rewritten
        d = torch.bmm(x.view(25, 10, 1), w.t().expand(25, 1, 40))  # batched, over a stretched operand: rewritten
        back = torch.bmm(v.transpose(1, 2), x.view(25, 10, 1))  # [25, 40, 10] @ [25, 10, 1]: a sum, left alone
        fused = torch.addmm(bias, x, w.t())  # a bias added in the same call: left alone
        return h.relu(), d * 2, back, fused

    gm = make_fx(f, tracing_mode="fake")(x, w, v, bias)
    before = _products(gm)
    plain = [n for n in before if n.target != _aten.addmm.default]
    assert sum(is_outer_product(*(a.meta["val"] for a in n.args)) for n in plain) == 2
    OuterProducts()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    after = _products(gm)
    assert len(after) == len(before) - 2
    assert {n.target for n in after} == {_aten.bmm.default, _aten.addmm.default}
    for n in gm.graph.nodes:
        if n.op == "call_function":  # Inductor's lowering reads each node's fake value: right shape and layout
            assert isinstance(n.meta.get("val"), torch.Tensor), n
    assert OuterProducts().uuid()  # Inductor caches compiled graphs under it (None: no caching)
    got, expected = gm(x, w, v, bias), f(x, w, v, bias)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(_bits(a), _bits(b))  # one multiplication per element either way


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_rewritten_mm_keeps_signed_zeros_infinities_and_nans(dtype: torch.dtype) -> None:
    """``torch.equal`` would let -0.0 pass for +0.0: the bits are compared, on the values where they differ."""
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-310, -3.5], dtype=dtype)
    x, w = special.view(-1, 1), special.view(1, -1)
    gm = make_fx(torch.mm, tracing_mode="fake")(x, w)
    OuterProducts()(gm.graph)
    gm.recompile()
    assert not _products(gm)
    assert torch.equal(_bits(gm(x, w)), _bits(torch.mm(x, w)))


def test_a_compiled_function_with_the_pass_equals_eager_to_the_bit() -> None:
    """Through Inductor (the pass as ``compile()`` installs it): the product and what it fuses with."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(250, 1, generator=g), torch.randn(40, 1, generator=g)

    def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w.t())

    seen: list[tuple[int, int]] = []
    original = OuterProducts.__call__

    def counting(self: OuterProducts, graph: torch.fx.Graph) -> None:
        before = sum(n.target is _aten.mm.default for n in graph.nodes)
        original(self, graph)
        seen.append((before, sum(n.target is _aten.mm.default for n in graph.nodes)))

    OuterProducts.__call__ = counting  # type: ignore[method-assign]
    try:
        compiled = torch.compile(layer, options={"post_grad_custom_pre_pass": OuterProducts()})
        with torch._inductor.config.patch(fx_graph_cache=False):
            got = compiled(x, w)
    finally:
        OuterProducts.__call__ = original  # type: ignore[method-assign]
        torch._dynamo.reset()
    assert seen == [(1, 0)]  # the pass ran and rewrote the mm (Inductor's decompositions leave this size to it)
    assert torch.equal(_bits(got), _bits(layer(x, w)))
