"""An Inductor graph pass that sums a permuted tensor in its own memory order: ``sum(permute(y, p), d)`` as
``permute(sum(y, p[d]), p)``.

Under ``vmap`` each task's weight gradient is a batched product, and autograd often hands it on transposed
(``F.linear``'s weight is ``[out, in]``, the product gives ``[in, out]``). The meta-gradient sums it over the
tasks. Inductor's CPU code for that sum walks the output's order, so it reads the product across its rows,
one element per cache line, without vector instructions. On the sinusoid MAML step, ``[25, 40, 40]`` summed over
the tasks into a transposed ``[40, 40]`` took about 20 µs of a 330 µs graph. Summed in the product's own order,
the same loop reads whole rows with vector loads; the result is read through a transposed view.

The pass rewrites ``aten.sum.dim_IntList`` over one dimension of a permuted (or transposed) view of a contiguous
CPU tensor of static sizes, where the view is not contiguous. On one thread Inductor's code adds the same numbers
in the same order (the reduced index runs as before), so the values are equal to the last bit (tested). On several
threads Inductor may split the now vectorised sum's index between them, which changes its rounding (not on the
sinusoid step's ``[25, 40, 40]``, but on ``[1024, 8, 6]``: float32 rounding either way).
:meth:`metagrad.MetaLearner.compile` adds it on the CPU (:func:`metagrad.graph_passes.cpu_passes`).
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["PermutedReduction"]

_aten = torch.ops.aten
_VIEWS = (_aten.permute.default, _aten.transpose.int)  # (Inductor's post-grad graph has only permutes)


def _rewritable(node: torch.fx.Node) -> tuple[torch.fx.Node, list[int], int, bool] | None:
    """``(y, p, d, keepdim)`` when ``node`` is ``sum(permute(y, p), [d], keepdim)`` worth rewriting."""
    if node.op != "call_function" or node.target is not _aten.sum.dim_IntList or node.kwargs.get("dtype"):
        return None
    view, dims, *rest = node.args
    keepdim = bool(rest[0] if rest else node.kwargs.get("keepdim", False))
    if not isinstance(view, torch.fx.Node) or view.target not in _VIEWS or len(dims or ()) != 1:
        return None
    y = view.args[0]
    vy, vview = (n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in (y, view))
    if not (isinstance(vy, torch.Tensor) and isinstance(vview, torch.Tensor)) or vy.device.type != "cpu":
        return None
    if not all(isinstance(n, int) for n in (*vy.shape, *vy.stride(), *vview.stride())):
        return None  # symbolic sizes (dynamic or data-dependent shapes): left alone, as the bmm pass does
    if not vy.is_contiguous() or vview.is_contiguous():  # only where the permuted order is the slow one
        return None
    if view.target is _aten.permute.default:
        perm = [p % vy.dim() for p in view.args[1]]
    else:  # transpose(y, a, b): the permutation that swaps a and b
        a, b, perm = view.args[1] % vy.dim(), view.args[2] % vy.dim(), list(range(vy.dim()))
        perm[a], perm[b] = b, a
    return y, perm, dims[0] % vy.dim(), keepdim


class PermutedReduction(CustomGraphPass):
    """Inductor's post-grad pass: each one-dimension ``sum`` of a permuted contiguous CPU tensor summed in the
    tensor's own order (see the module's docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            found = _rewritable(node)
            if found is None:
                continue
            y, perm, d, keepdim = found
            with graph.inserting_before(node):
                total = graph.call_function(_aten.sum.dim_IntList, (y, [perm[d]], True))
                total.meta = {"val": y.meta["val"].sum(perm[d], keepdim=True)}
                out = graph.call_function(_aten.permute.default, (total, perm))
                out.meta = {"val": total.meta["val"].permute(perm)}
                if not keepdim:
                    squeezed = graph.call_function(_aten.squeeze.dim, (out, d))
                    squeezed.meta = {"val": out.meta["val"].squeeze(d)}
                    out = squeezed
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        # Inductor's compiled-graph cache keys on this: a changed pass compiles afresh.
        return get_hash_for_files((__file__,))
