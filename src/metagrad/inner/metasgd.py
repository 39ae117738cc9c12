"""Meta-SGD: a learned inner learning rate for every parameter element.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017. The rates start at
the inner learning rate and are shared by all inner steps.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from metagrad.inner.base import InnerRule, Params
from metagrad.inner.rates import decode_rate, encode_rate

__all__ = ["MetaSGD"]


class MetaSGD(InnerRule):
    """Update ``α ⊙ g`` with ``α`` of the parameter's shape, learned by the outer optimizer."""

    prefix = "metasgd"

    def __init__(self, lr: float, parameterization: str = "log") -> None:
        super().__init__()
        self.lr = float(lr)
        self.parameterization = parameterization
        encode_rate(self.lr, (1,), parameterization, Tensor())

    def init(self, params: Mapping[str, Tensor]) -> Params:
        return {
            f"{self.prefix}.{n}": encode_rate(self.lr, tuple(p.shape), self.parameterization, p)
            for n, p in params.items()
        }

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        return {n: decode_rate(meta[f"{self.prefix}.{n}"], self.parameterization) * g for n, g in grads.items()}
