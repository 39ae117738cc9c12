"""The fully connected network of the MAML sinusoid experiments (1-40-40-1, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from metagrad.registry import register_model

__all__ = ["MLP", "MLPConfig", "ACTIVATIONS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}


@dataclass
class MLPConfig:
    """``[model]`` options of the MLP (``name = "mlp"``)."""

    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"


@register_model("mlp", config=MLPConfig)
class MLP(nn.Sequential):
    """Linear layers with ``activation`` between them; used through ``torch.func.functional_call``."""

    def __init__(
        self,
        in_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        out_features: int = 1,
        activation: str = "relu",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = [in_features, *hidden, out_features]
        if any(int(s) <= 0 for s in sizes):
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            layers.append(nn.Linear(int(a), int(b)))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)

    @classmethod
    def from_config(cls, options: MLPConfig, spec: Any) -> MLP:
        """Built for the task's vector inputs and outputs."""
        from metagrad.errors import ConfigError

        if len(spec.input_shape) != 1:
            raise ConfigError(f"model mlp needs vector inputs; the task gives {tuple(spec.input_shape)}: use conv4")
        return cls(spec.input_shape[0], tuple(options.hidden), spec.outputs, options.activation)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - nn.Sequential's, typed
        return super().forward(x)
