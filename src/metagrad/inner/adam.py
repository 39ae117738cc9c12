"""Adam in the inner loop, as a stateful rule (Kingma & Ba 2015; Reptile's inner optimizer uses β1 = 0).

The update is ``lr · m̂ / (√v̂ + eps)`` with bias-corrected moment estimates; with ``beta1 = 0`` (the default, as
in the Reptile paper's code) ``m̂`` is the gradient itself and only the second moment ``v`` is state. The state
(``adam.v.<name>``, ``adam.m.<name>`` and the step count ``adam.t``) starts at zero for every adaptation, unless
an algorithm carries it over (Reptile's ``persist_inner_state``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from metagrad.inner.base import InnerRule, Params

__all__ = ["Adam"]


class Adam(InnerRule):
    """Inner Adam with a fixed learning rate; ``update`` alone (no state) is not defined for it."""

    prefix = "adam"

    def __init__(self, lr: float, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"inner learning rate must be finite and >= 0, got {lr}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and eps > 0):
            raise ValueError(f"need 0 <= beta1, beta2 < 1 and eps > 0, got {beta1}, {beta2}, {eps}")
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)

    def init_state(self, params: Mapping[str, Tensor]) -> Params:
        ref = next(iter(params.values()))
        state = {f"{self.prefix}.v.{n}": torch.zeros_like(p) for n, p in params.items()}
        if self.beta1:
            state.update({f"{self.prefix}.m.{n}": torch.zeros_like(p) for n, p in params.items()})
        state[f"{self.prefix}.t"] = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return state

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        raise TypeError("Adam is a stateful rule: call update_with_state")

    def update_with_state(
        self, grads: Mapping[str, Tensor], state: Mapping[str, Tensor], meta: Mapping[str, Tensor], step: int
    ) -> tuple[Params, Params]:
        p = self.prefix
        new = dict(state)
        t = state[f"{p}.t"] + 1
        new[f"{p}.t"] = t
        out: Params = {}
        for n, g in grads.items():
            v = self.beta2 * state[f"{p}.v.{n}"] + (1 - self.beta2) * g**2
            new[f"{p}.v.{n}"] = v
            m = g
            if self.beta1:
                m = self.beta1 * state[f"{p}.m.{n}"] + (1 - self.beta1) * g
                new[f"{p}.m.{n}"] = m
                m = m / (1 - self.beta1**t)
            v_hat = v / (1 - self.beta2**t)
            # sqrt has an infinite derivative at 0 (an exactly-zero inner gradient): second order would give NaN.
            positive = v_hat > 0
            root = torch.where(positive, torch.where(positive, v_hat, torch.ones_like(v_hat)).sqrt(), 0.0)
            out[n] = self.lr * m / (root + self.eps)
        return out, new
