"""Meta-SGD (Li et al. 2017): MAML whose inner step uses a learned learning rate for every weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from metagrad.algorithms.maml import MAML, check_switches
from metagrad.errors import ConfigError
from metagrad.inner.metasgd import MetaSGD as MetaSGDRule
from metagrad.registry import register_algorithm

__all__ = ["MetaSGD", "MetaSGDConfig"]


@dataclass
class MetaSGDConfig:
    """``[algorithm]`` options of Meta-SGD (``name = "metasgd"``); the rates start at ``inner_lr``."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    anil: bool = False
    rate_parameterization: str = "log"
    multi_step_loss: bool = False
    msl_epochs: int = 10
    epoch_iterations: int = 500
    first_order_iterations: int = 0

    def validate(self, cfg: Any) -> None:
        check_switches(self, {"msl_epochs": "multi_step_loss", "epoch_iterations": "multi_step_loss"})
        if self.inner_lr <= 0:
            raise ConfigError("algorithm.inner_lr must be > 0 for learned rates (they start at it)")


@register_algorithm("metasgd", config=MetaSGDConfig)
class MetaSGD(MAML):
    """``θ ← θ − α ⊙ ∇θ L_support`` with ``α`` learned jointly with ``θ``."""

    name = "metasgd"

    def __init__(
        self, model: nn.Module, *, inner_lr: float = 0.01, parameterization: str = "log", **kwargs: Any
    ) -> None:
        super().__init__(model, MetaSGDRule(inner_lr, parameterization), inner_lr=inner_lr, **kwargs)
        self.name = "metasgd"

    @classmethod
    def from_config(cls, options: MetaSGDConfig, model: nn.Module, spec: Any) -> MetaSGD:
        values = {k: v for k, v in vars(options).items() if k not in ("anil", "rate_parameterization")}
        return cls(
            model,
            parameterization=options.rate_parameterization,
            adapt_only=cls.last_layer(model) if options.anil else None,
            **cls.spec_options(spec),
            **values,
        )
