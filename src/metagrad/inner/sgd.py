"""Plain SGD in the inner loop: the update is ``lr · g`` (Finn et al. 2017)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from metagrad.inner.base import InnerRule, Params

__all__ = ["SGD"]


class SGD(InnerRule):
    """A fixed inner learning rate, the same for every tensor and step."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"inner learning rate must be finite and >= 0, got {lr}")
        self.lr = float(lr)

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        return {k: self.lr * g for k, g in grads.items()}
