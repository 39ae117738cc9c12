"""An Inductor graph pass that turns narrow batched matrix products on the CPU around: ``A @ B`` as
``(Bᵀ @ Aᵀ)ᵀ`` where the product's rows are narrower than one AVX-512 vector and its columns are not.

Under ``vmap`` every per-task linear layer becomes a batched product (``bmm``), and the second-order meta-gradient
differentiates each one twice more. Some of the products that autograd writes are tall and narrow, such as
``[tasks, 40, 40] @ [tasks, 40, 10]`` on the sinusoid MLP with 10 points per task. PyTorch's CPU ``bmm``
(oneMKL) computes such a product 1.6-8.6× slower than the same numbers transposed,
``[tasks, 10, 40] @ [tasks, 40, 40]``, whose output rows are 40 wide (``benchmarks/bmm_orientation.py``, float32, one
core; float64 gains less, up to 4.3×).

The pass rewrites only ``aten.bmm`` on float32 and float64 CPU tensors where ``N < 16 <= M`` for a
``[B, M, K] @ [B, K, N]`` product (M and N static; B and K may be symbolic). It changes no value beyond float
rounding: the same sums of the same products, in another memory order. The result is read through a transposed
view; Inductor copies it only where a consumer needs the other layout. On the sinusoid MAML step it took 9 % (one
inner step) and 26 % (five) off a training iteration (``benchmarks/compile_ab.py``, ``docs/results.md``).

The rule was measured on one machine, an AVX-512 AMD EPYC with PyTorch's oneMKL. :meth:`metagrad.MetaLearner.compile`
adds the pass by default on x86 CPUs where PyTorch uses MKL (:func:`measured_here`), and nowhere else, in the chain
of :func:`metagrad.graph_passes.cpu_passes`. To keep that chain with options of your own, pass
``options={"post_grad_custom_post_pass": cpu_passes(), ...}`` (or ``GraphPasses(*cpu_passes().passes, your_pass)``).
"""

from __future__ import annotations

import platform

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["NARROW", "BatchedMatmulOrientation", "measured_here", "turns_around"]

NARROW = 16
"""Rows narrower than this (16 float32 lanes of an AVX-512 register) and columns at least this wide are turned
around. In float64 the gain is smaller (0.97-4.3×, median 1.7×, ``benchmarks/bmm_orientation.py``)."""

_aten = torch.ops.aten
_MEASURED = (torch.float32, torch.float64)


def measured_here() -> bool:
    """Whether this machine is of the kind the rule was measured on: x86 with PyTorch's MKL."""
    return platform.machine() in ("x86_64", "AMD64") and torch.backends.mkl.is_available()


def turns_around(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the pass computes ``bmm(a, b)`` as ``bmm(bᵀ, aᵀ)ᵀ``: float32 or float64 CPU tensors (the measured
    cases; half precision takes oneDNN's kernels), M and N static, ``N < 16 <= M``."""
    if a.dim() != 3 or b.dim() != 3 or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.dtype not in _MEASURED or b.dtype != a.dtype:
        return False
    m, n = a.shape[1], b.shape[2]
    if not (isinstance(m, int) and isinstance(n, int)):  # symbolic sizes (dynamic shapes): left alone
        return False
    return n < NARROW <= m


def _transposed(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    out = graph.call_function(_aten.permute.default, (node, [0, 2, 1]))
    out.meta["val"] = node.meta["val"].permute(0, 2, 1)
    return out


class BatchedMatmulOrientation(CustomGraphPass):
    """Inductor's ``post_grad_custom_post_pass``: every narrow CPU ``bmm`` computed the other way round (see the
    module's docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not _aten.bmm.default or node.kwargs:
                continue
            a, b = node.args
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            va, vb = a.meta.get("val"), b.meta.get("val")
            if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and turns_around(va, vb)):
                continue
            with graph.inserting_before(node):
                bt, at = _transposed(graph, b), _transposed(graph, a)
                product = graph.call_function(_aten.bmm.default, (bt, at))
                product.meta = {**node.meta, "val": torch.bmm(bt.meta["val"], at.meta["val"])}
                product.meta.pop("tensor_meta", None)  # the [B, M, N] original's, not this [B, N, M] product's
                out = _transposed(graph, product)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        # Inductor's compiled-graph cache keys on this: a changed pass compiles afresh.
        return get_hash_for_files((__file__,))
