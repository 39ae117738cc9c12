"""Layer-specific, per-step learned inner learning rates (LSLR).

Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, section 4. Each parameter tensor (or each
layer, with ``per_layer=True``: weight and bias share a rate) has one learned rate per inner step, initialised
to the inner learning rate.

Steps past the trained ones (evaluation with more steps than training): with ``beyond="stop"`` (the default)
the rate is 0, so adaptation ends where the meta-learned schedule ends and the weights stay put; with
``beyond="last"`` the last trained step's rate is reused. Learned rates grow large (they only ever had to
work for the trained steps), and reusing them was measured to diverge on some sinusoid tasks
(docs/results.md), hence the default.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metagrad.inner.base import InnerRule, Params
from metagrad.inner.rates import decode_rate, encode_rate

__all__ = ["LSLR", "BEYOND"]

BEYOND = ("stop", "last")


class LSLR(InnerRule):
    """Update ``α[tensor][step] · g`` with ``α`` learned by the outer optimizer (see ``beyond``)."""

    prefix = "lslr"

    def __init__(
        self, lr: float, steps: int, per_layer: bool = False, parameterization: str = "log", beyond: str = "stop"
    ) -> None:
        super().__init__()
        if steps <= 0:
            raise ValueError(f"LSLR needs a positive number of trained inner steps, got {steps}")
        self.lr = float(lr)
        self.steps = int(steps)
        self.per_layer = per_layer
        self.parameterization = parameterization
        if beyond not in BEYOND:
            raise ValueError(f"beyond must be one of {BEYOND}, got {beyond!r}")
        self.beyond = beyond
        encode_rate(self.lr, (1,), parameterization, Tensor())  # validates lr and parameterization

    def key(self, name: str) -> str:
        group = name.rsplit(".", 1)[0] if self.per_layer and "." in name else name
        return f"{self.prefix}.{group}"

    def init(self, params: Mapping[str, Tensor]) -> Params:
        return {self.key(n): encode_rate(self.lr, (self.steps,), self.parameterization, p) for n, p in params.items()}

    def rates(self, meta: Mapping[str, Tensor], name: str) -> Tensor:
        """The decoded per-step rates [steps] that apply to parameter ``name``."""
        return decode_rate(meta[self.key(name)], self.parameterization)

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        if step >= self.steps and self.beyond == "stop":
            return {n: torch.zeros_like(g) for n, g in grads.items()}
        s = min(step, self.steps - 1)
        return {n: decode_rate(meta[self.key(n)][s], self.parameterization) * g for n, g in grads.items()}
