"""Meta-Curvature: learned Kronecker-factored preconditioners of the inner gradient.

Park & Oliva, "Meta-Curvature", NeurIPS 2019 (arXiv 1902.03356). For a linear weight G (out, in) the update
direction is ``M_out · G · M_in``; for a convolution weight (out, in, kh, kw) it is the mode product with
``M_out`` (out × out), ``M_in`` (in × in) and ``M_f`` (kh·kw × kh·kw), i.e. in row-major flattening
``(M_out ⊗ M_inᵀ ⊗ M_fᵀ) vec(G)``; a bias (or any other tensor) gets an element-wise vector. Factors start at
the identity (vectors at ones), are shared by every inner step, and are trained by the outer optimizer.
One ``einsum`` per tensor, in PyTorch's native layouts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metagrad.inner.base import InnerRule, Params

__all__ = ["Curvature"]


class Curvature(InnerRule):
    """Precondition each gradient tensor with its learned Kronecker factors (no learning rate of its own)."""

    prefix = "curvature"

    def kind(self, p: Tensor) -> str:
        if p.ndim == 2:
            return "linear"
        if p.ndim >= 3:
            return "conv"
        return "vector"

    def init(self, params: Mapping[str, Tensor]) -> Params:
        out: Params = {}
        for n, p in params.items():
            kw = {"dtype": p.dtype, "device": p.device}
            kind = self.kind(p)
            if kind == "vector":
                out[f"{self.prefix}.{n}.vec"] = torch.ones(p.shape, **kw)
                continue
            out[f"{self.prefix}.{n}.out"] = torch.eye(p.shape[0], **kw)
            out[f"{self.prefix}.{n}.in"] = torch.eye(p.shape[1], **kw)
            if kind == "conv":
                f = int(torch.tensor(p.shape[2:]).prod())
                out[f"{self.prefix}.{n}.f"] = torch.eye(f, **kw)
        return out

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        out: Params = {}
        for n, g in grads.items():
            key = f"{self.prefix}.{n}"
            kind = self.kind(g)
            if kind == "vector":
                out[n] = meta[f"{key}.vec"] * g
            elif kind == "linear":
                out[n] = meta[f"{key}.out"] @ g @ meta[f"{key}.in"]
            else:
                flat = g.reshape(g.shape[0], g.shape[1], -1)
                pre = torch.einsum("oa,aig,ib,gf->obf", meta[f"{key}.out"], flat, meta[f"{key}.in"], meta[f"{key}.f"])
                out[n] = pre.reshape(g.shape)
        return out
