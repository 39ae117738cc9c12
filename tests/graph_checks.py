"""Checks shared by the tests of metagrad's Inductor graph passes (test_graph_passes, test_permuted_reduction,
test_matmul_orientation): the fake values a pass writes, and the sums it targets."""

from __future__ import annotations

import torch

_VIEWS = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


def assert_vals_are_real(gm: torch.fx.GraphModule, *args: torch.Tensor) -> None:
    """Run ``gm`` node by node on ``args``: every call's fake ``val`` (and ``tensor_meta``, if any) has its real
    value's shape (Inductor's lowering reads it). Not its strides: the nodes after a rewrite keep the vals of the
    old layout until Inductor propagates the fake tensors again, after the custom pass."""
    real: dict[torch.fx.Node, object] = {}
    interpreter = torch.fx.Interpreter(gm)
    run_node = interpreter.run_node

    def recording(n: torch.fx.Node) -> object:
        real[n] = run_node(n)
        return real[n]

    interpreter.run_node = recording  # type: ignore[method-assign]
    interpreter.run(*args)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            val = n.meta.get("val")
            assert isinstance(val, torch.Tensor), n
            assert val.shape == real[n].shape, n
            assert "tensor_meta" not in n.meta or n.meta["tensor_meta"].shape == real[n].shape, n


def slow_sums(graph: torch.fx.Graph) -> int:
    """Sums over a non-contiguous permuted view of a contiguous tensor: PermutedReduction's targets."""
    count = 0
    for n in graph.nodes:
        if n.target is torch.ops.aten.sum.dim_IntList and getattr(n.args[0], "target", None) in _VIEWS:
            count += n.args[0].args[0].meta["val"].is_contiguous() and not n.args[0].meta["val"].is_contiguous()
    return count
