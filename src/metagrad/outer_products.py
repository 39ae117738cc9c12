"""An Inductor graph pass that computes a CPU matrix product over one shared index, ``[M, 1] @ [1, N]``, as the
element-wise product it is.

A network whose first layer reads one feature (the sinusoid MLP's ``1 → 40``) has such products on all its
points: the layer's forward on the support and query sets and their derivatives, four on the one-step sinusoid
MAML step. PyTorch's CPU ``mm`` sends each to oneMKL's ``gemm``, after copying an operand that Inductor laid out
with a zero stride (which BLAS does not take), where the element-wise product is one fused loop. Inductor
decomposes such products itself only up to 32 elements.

Each output element is one multiplication either way, so the values are the same to the bit (tested). The pass
rewrites ``aten.mm`` only, on float32 and float64 CPU tensors (an ``addmm`` would add its bias in another rounding;
batched products Inductor already decomposes). :meth:`metagrad.MetaLearner.compile` adds it on x86 CPUs with
oneMKL, where it was measured (:func:`metagrad.graph_passes.cpu_passes`; ``benchmarks/compile_ab.py``).
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["OuterProducts"]

_aten = torch.ops.aten
_EXACT = (torch.float32, torch.float64)


def _outer(node: torch.fx.Node) -> bool:
    """Whether ``node`` is ``mm(a, b)`` over one shared index, on float32 or float64 CPU tensors."""
    if node.op != "call_function" or node.target is not _aten.mm.default or node.kwargs or len(node.args) != 2:
        return False
    values = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in node.args]
    if not all(isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype in _EXACT for v in values):
        return False
    a, b = values
    shared = (a.shape[1], b.shape[0])  # a symbolic size (dynamic shapes) is left alone, as the bmm pass does
    return a.dtype == b.dtype and all(isinstance(k, int) and k == 1 for k in shared)


class OuterProducts(CustomGraphPass):
    """Inductor's post-grad pass: every CPU ``mm`` over one shared index as a broadcast ``mul`` (see the module's
    docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if not _outer(node):
                continue
            a, b = node.args
            with graph.inserting_before(node):
                product = graph.call_function(_aten.mul.Tensor, (a, b))
                product.meta = {"val": a.meta["val"] * b.meta["val"]}
            node.replace_all_uses_with(product)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        # Inductor's compiled-graph cache keys on this: a changed pass compiles afresh.
        return get_hash_for_files((__file__,))
