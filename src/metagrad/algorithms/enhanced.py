"""MAML Enhanced: MAML whose inner step is ``θ ← θ − α(step, tensor) · MC(g)``.

Meta-Curvature (Park & Oliva 2019) preconditions each gradient with learned Kronecker factors; LSLR
(Antoniou et al. 2019) scales it with a learned rate per tensor and inner step; training uses the MAML++
multi-step loss and, optionally, derivative-order annealing and cosine meta-lr annealing (the latter set in
the trainer's config).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metagrad.algorithms.maml import MAML
from metagrad.inner.base import Chain
from metagrad.inner.curvature import Curvature
from metagrad.inner.lslr import LSLR

__all__ = ["MAMLEnhanced"]


class MAMLEnhanced(MAML):
    """``MAMLEnhanced(model)``: the preset, tuned on the sinusoid benchmark (see docs/results.md)."""

    name = "maml_enhanced"

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        curvature: bool = True,
        per_layer: bool = False,
        parameterization: str = "log",
        beyond: str = "stop",
        multi_step_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        lslr = LSLR(inner_lr, inner_steps, per_layer=per_layer, parameterization=parameterization, beyond=beyond)
        rule = Chain(Curvature(), lslr) if curvature else lslr
        super().__init__(
            model, rule, inner_lr=inner_lr, inner_steps=inner_steps, multi_step_loss=multi_step_loss, **kwargs
        )
        self.name = "maml_enhanced"
