"""Meta-SGD (Li et al. 2017): MAML whose inner step uses a learned learning rate for every weight."""

from __future__ import annotations

from typing import Any

from torch import nn

from metagrad.algorithms.maml import MAML
from metagrad.inner.metasgd import MetaSGD as MetaSGDRule

__all__ = ["MetaSGD"]


class MetaSGD(MAML):
    """``θ ← θ − α ⊙ ∇θ L_support`` with ``α`` learned jointly with ``θ``."""

    name = "metasgd"

    def __init__(
        self, model: nn.Module, *, inner_lr: float = 0.01, parameterization: str = "log", **kwargs: Any
    ) -> None:
        super().__init__(model, MetaSGDRule(inner_lr, parameterization), inner_lr=inner_lr, **kwargs)
        self.name = "metasgd"
