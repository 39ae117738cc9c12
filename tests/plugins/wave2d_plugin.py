"""A researcher's own task family and model, outside metagrad: what docs/extending.md describes.

The 2-D regression ``y = a·x1 + b·sin(c·x2)`` with ``a``, ``b``, ``c`` drawn per task, and a small residual MLP.
Used by tests/test_plugins.py through ``task.name = "wave2d_plugin:Wave2D"`` and
``model.name = "wave2d_plugin:ResMLP"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from metagrad import TaskBatch, register_algorithm, register_model, register_task


@dataclass
class Wave2DConfig:
    shots: int = 10
    queries: int = 10
    a: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    b: list[float] = field(default_factory=lambda: [0.5, 2.0])
    c: list[float] = field(default_factory=lambda: [0.5, 2.0])


@register_task("wave2d", config=Wave2DConfig)
class Wave2D:
    loss = "mse"
    input_shape = (2,)
    outputs = 1
    name = "wave2d"

    def __init__(self, cfg: Wave2DConfig, split: str) -> None:
        self.cfg = cfg

    def sample(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
        def uniform(shape: tuple[int, ...], lo_hi: list[float]) -> torch.Tensor:
            lo, hi = lo_hi
            return torch.rand(shape, generator=generator) * (hi - lo) + lo

        a, b, c = (uniform((batch_size, 1, 1), r) for r in (self.cfg.a, self.cfg.b, self.cfg.c))
        x = uniform((batch_size, shots + queries, 2), [-3.0, 3.0])
        y = a * x[..., :1] + b * torch.sin(c * x[..., 1:])
        dtype = torch.get_default_dtype()
        x, y = x.to(dtype), y.to(dtype)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


@dataclass
class ResMLPConfig:
    width: int = 16


@register_model("resmlp", config=ResMLPConfig)
class ResMLP(nn.Module):
    def __init__(self, cfg: ResMLPConfig, spec) -> None:
        super().__init__()
        self.inp = nn.Linear(spec.input_shape[0], cfg.width)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(cfg.width, cfg.width), nn.Tanh())
        self.head = nn.Linear(cfg.width, spec.outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(h + self.block(h))


# ----- a new inner rule and a new algorithm ---------------------------------------------------------------------
from metagrad import MAML  # noqa: E402
from metagrad.inner import InnerRule  # noqa: E402


class ClippedSGD(InnerRule):
    """An inner rule: SGD whose step is at most ``max_norm`` long per tensor (differentiable, so second order)."""

    def __init__(self, lr: float, max_norm: float) -> None:
        super().__init__()
        self.lr, self.max_norm = lr, max_norm

    def update(self, grads, step, meta):
        return {k: self.lr * g / (g.norm() / self.max_norm).clamp_min(1.0) for k, g in grads.items()}


@dataclass
class ClippedMAMLConfig:
    inner_lr: float = 0.05
    inner_steps: int = 2
    max_norm: float = 1.0


@register_algorithm("clipped_maml", config=ClippedMAMLConfig)
class ClippedMAML(MAML):
    """MAML with the clipped inner rule: the algorithm overrides nothing but its construction."""

    @classmethod
    def from_config(cls, options: ClippedMAMLConfig, model, spec):
        rule = ClippedSGD(options.inner_lr, options.max_norm)
        return cls(
            model, rule, inner_steps=options.inner_steps, loss=spec.loss, metric=spec.metric, vectorize=spec.vectorize
        )
