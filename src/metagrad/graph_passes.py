"""The Inductor graph passes that :meth:`metagrad.MetaLearner.compile` adds on the CPU, run as Inductor's one
``post_grad_custom_post_pass``.

:class:`GraphPasses` runs several passes in order as one and keys Inductor's compiled-graph cache on all of them
and on this file (older PyTorch versions take one custom pass per slot). :func:`cpu_passes` is the default
chain: a new pass is added there. ``compile()`` sets it only when the caller gives no Inductor ``options``; with
options of your own, keep it with ``options={"post_grad_custom_post_pass": cpu_passes(), ...}``, or add a pass of
your own after it: ``GraphPasses(*cpu_passes().passes, your_pass)``.
"""

from __future__ import annotations

import hashlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from metagrad import matmul_orientation
from metagrad.outer_products import OuterProducts
from metagrad.permuted_reduction import PermutedReduction

__all__ = ["GraphPasses", "cpu_passes"]


class GraphPasses(CustomGraphPass):
    """``passes`` run in order on the post-grad graph, as one Inductor custom pass."""

    def __init__(self, *passes: CustomGraphPass) -> None:
        self.passes = passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> bytes | None:
        keys = [p.uuid() for p in self.passes]
        if any(k is None for k in keys):  # one pass that cannot be keyed: no caching (as Inductor does for it)
            return None
        digest = hashlib.sha256(get_hash_for_files((__file__,)))  # (a changed chain compiles afresh too)
        for p, k in zip(self.passes, keys, strict=True):
            digest.update(f"{type(p).__qualname__}:".encode() + (k if isinstance(k, bytes) else str(k).encode()))
        return digest.digest()

    def __repr__(self) -> str:
        return f"GraphPasses({', '.join(type(p).__name__ for p in self.passes)})"


def cpu_passes() -> GraphPasses:
    """The passes ``compile()`` adds on the CPU, in this order: where they were measured (x86 with oneMKL),
    :class:`OuterProducts` and :class:`~metagrad.matmul_orientation.BatchedMatmulOrientation`, which stand in for
    oneMKL calls; everywhere :class:`PermutedReduction`, which changes Inductor's own loops, last, so that it also
    sums the products that the bmm pass turned around in their own order."""
    if matmul_orientation.measured_here():
        return GraphPasses(OuterProducts(), matmul_orientation.BatchedMatmulOrientation(), PermutedReduction())
    return GraphPasses(PermutedReduction())
