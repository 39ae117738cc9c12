"""An Inductor graph pass that computes matrix products over one shared index, ``[.., M, 1] @ [.., 1, N]``, as
the broadcast product ``A * B`` that they are.

A network whose inputs or outputs are one wide (the sinusoid MLP's first and last layers, any scalar regression)
gives such products under ``vmap`` and autograd: the first layer's forward pass on the tasks' points,
``[250, 1] @ [1, 40]``, and the backward pass through the last layer. PyTorch computes each through oneMKL's
``gemm``, a call of several microseconds that also copies its one-wide operand (its strides are not ``gemm``'s),
where an element-wise product takes a fraction of that and fuses with its neighbours (the bias and the
activation). On the sinusoid MAML step that is four calls per iteration.

Every output element of such a product is one multiplication, so the rewrite is exact: for ``mm``, the same
bits as oneMKL's, signed zeros, infinities and NaNs included (tested). The pass rewrites ``aten.mm`` and
``aten.bmm`` on float32 and float64 CPU tensors whose shared index has static size 1, and nothing else (not
``addmm``, whose added bias ``gemm`` may round together with the product). Inductor's own decompositions already
turn such ``bmm`` products, and ``mm`` products of at most 32 elements in all, into the same multiplication before
this pass runs, so in practice it rewrites the larger ``mm`` products. (Eager ``bmm`` gives +0.0 where the product
is -0.0, for example 0 times a negative number; the multiplication, Inductor's and this pass's, gives -0.0.)

:meth:`metagrad.MetaLearner.compile` adds it on the CPU as Inductor's ``post_grad_custom_pre_pass``; to keep it
with options of your own, pass ``options={"post_grad_custom_pre_pass": OuterProducts(), ...}``.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["OuterProducts", "is_outer_product"]

_aten = torch.ops.aten
_PRODUCTS = (_aten.mm.default, _aten.bmm.default)
_EXACT = (torch.float32, torch.float64)


def is_outer_product(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the pass computes ``a @ b`` (``mm`` or ``bmm``) as ``a * b``: float32 or float64 CPU tensors of
    one dtype whose shared index has static size 1."""
    if a.dim() != b.dim() or a.dim() not in (2, 3) or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.dtype not in _EXACT or b.dtype != a.dtype:
        return False
    k = a.shape[-1]
    return isinstance(k, int) and k == 1  # a symbolic size (dynamic shapes) is left alone


class OuterProducts(CustomGraphPass):
    """Inductor's ``post_grad_custom_pre_pass``: every CPU ``mm`` and ``bmm`` over a shared index of size 1 as an
    element-wise product (see the module's docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _PRODUCTS or node.kwargs:
                continue
            a, b = node.args
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            va, vb = a.meta.get("val"), b.meta.get("val")
            if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and is_outer_product(va, vb)):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(_aten.mul.Tensor, (a, b))
            product.meta = {**node.meta, "val": va * vb}
            product.meta.pop("tensor_meta", None)
            node.replace_all_uses_with(product)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        # Inductor's compiled-graph cache keys on this: a changed pass compiles afresh.
        return get_hash_for_files((__file__,))
