"""MAML Enhanced: MAML whose inner step is ``θ ← θ − α(step, tensor) · MC(g)``.

Meta-Curvature (Park & Oliva 2019) preconditions each gradient with learned Kronecker factors; LSLR
(Antoniou et al. 2019) scales it with a learned rate per tensor and inner step; training uses the MAML++
multi-step loss and, optionally, derivative-order annealing and cosine meta-lr annealing (the latter set in
the trainer's config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from metagrad.algorithms.maml import MAML, check_switches
from metagrad.errors import ConfigError
from metagrad.inner.base import Chain
from metagrad.inner.curvature import Curvature
from metagrad.inner.lslr import LSLR
from metagrad.registry import register_algorithm

__all__ = ["MAMLEnhanced", "MAMLEnhancedConfig"]


@dataclass
class MAMLEnhancedConfig:
    """``[algorithm]`` options of MAML Enhanced (``name = "maml_enhanced"``). ``curvature = false`` or
    ``multi_step_loss = false`` are ablations: LSLR alone, or no MAML++ multi-step loss."""

    inner_lr: float = 0.01
    inner_steps: int = 5
    curvature: bool = True
    per_layer_lr: bool = False
    rate_parameterization: str = "log"
    lslr_beyond: str = "stop"
    multi_step_loss: bool = True
    msl_epochs: int = 10
    epoch_iterations: int = 500
    first_order: bool = False
    first_order_iterations: int = 0
    anil: bool = False

    @staticmethod
    def legacy(values: dict[str, Any]) -> dict[str, Any]:
        """A run record from before per-algorithm configs: its ``curvature`` and ``multi_step_loss`` (the shared
        section's defaults, false) were ignored then, the preset always had both on."""
        return {k: v for k, v in values.items() if k not in ("curvature", "multi_step_loss")}

    def validate(self, cfg: Any) -> None:
        check_switches(self, {"msl_epochs": "multi_step_loss", "epoch_iterations": "multi_step_loss"})
        if self.inner_steps == 0:
            raise ConfigError("algorithm.inner_steps must be positive for maml_enhanced (it learns per-step rates)")
        if self.inner_lr <= 0:
            raise ConfigError("algorithm.inner_lr must be > 0 for learned rates (they start at it)")


@register_algorithm("maml_enhanced", config=MAMLEnhancedConfig)
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

    @classmethod
    def from_config(cls, options: MAMLEnhancedConfig, model: nn.Module, spec: Any) -> MAMLEnhanced:
        values = {k: v for k, v in vars(options).items() if k not in ("anil", "rate_parameterization", "per_layer_lr",
                                                                        "lslr_beyond")}  # fmt: skip
        return cls(
            model,
            per_layer=options.per_layer_lr,
            parameterization=options.rate_parameterization,
            beyond=options.lslr_beyond,
            adapt_only=cls.last_layer(model) if options.anil else None,
            **cls.spec_options(spec),
            **values,
        )
