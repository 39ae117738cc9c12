"""``PermutedReduction``, the Inductor pass that sums a permuted tensor in its own memory order: which sums are
rewritten, and that the rewritten graph gives the same values (float64). tests/test_graph_passes.py checks the
compiled code bit for bit."""

from __future__ import annotations

import torch
from graph_checks import assert_vals_are_real, slow_sums
from torch.fx.experimental.proxy_tensor import make_fx

from metagrad.permuted_reduction import PermutedReduction

F64 = torch.float64


def _f(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g = torch.bmm(x.transpose(1, 2), y)  # [5, 24, 24] per "task", contiguous
    gt = g.transpose(1, 2)  # as autograd hands a linear layer's weight gradient on
    pt = g.permute(0, 2, 1)  # the same as a permutation, as in Inductor's post-grad graph
    four = w.permute(2, 0, 3, 1)  # [4, 3, 7, 6], not contiguous
    return (
        gt.sum(0),  # rewritten (no keepdim)
        pt.sum(0),  # rewritten
        gt.sum(0, keepdim=True) * 2,  # rewritten (keepdim)
        four.sum(2),  # rewritten: a middle dimension of a 4-d permutation
        four.sum(-1, keepdim=True),  # rewritten: a negative dimension
        gt.sum((0, 1)),  # two dimensions: left alone (the order of the sums could change)
        g.sum(0),  # not permuted: left alone
        gt.sum(0, dtype=F64),  # a dtype: left alone
        gt.contiguous().sum(0),  # contiguous: left alone
    )


def test_the_pass_sums_permuted_views_in_their_own_order_and_keeps_the_values() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y, w = (torch.randn(s, generator=gen, dtype=F64) for s in ((5, 10, 24), (5, 10, 24), (3, 6, 4, 7)))
    gm = make_fx(_f, tracing_mode="fake")(x, y, w)  # nodes carry fake "val"s, as in Inductor's post-grad graph
    assert slow_sums(gm.graph) == 7  # the five to rewrite, the two-dimension one and the one with a dtype
    PermutedReduction()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert slow_sums(gm.graph) == 2  # the two-dimension one and the one with a dtype
    assert_vals_are_real(gm, x, y, w)
    for got, expected in zip(gm(x, y, w), _f(x, y, w), strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
