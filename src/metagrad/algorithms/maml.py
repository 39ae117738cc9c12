"""MAML (Finn, Abbeel & Levine, ICML 2017) and first-order MAML, with the MAML++ training options.

The whole update rule: adapt with the inner rule on the support set, score the adapted weights on the query
set. Second order unless ``first_order``. MAML++ (Antoniou et al., ICLR 2019): ``multi_step_loss`` scores
every inner step with weights that anneal towards the last one; ``first_order_iterations`` trains first order
before switching to second order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import MetaLearner, Params, Task
from metagrad.inner.base import InnerRule
from metagrad.inner.sgd import SGD

__all__ = ["MAML", "multi_step_weights"]


def multi_step_weights(steps: int, epoch: int, anneal_epochs: int) -> list[float]:
    """MAML++ multi-step loss weights at ``epoch``: uniform at first, annealed towards the last step.

    Non-final ``max(1/N − e/(N·E), 0.03/N)``; final ``min(1/N + e(N−1)/(N·E), 1 − 0.03(N−1)/N)``.
    """
    n, e, big_e = steps, epoch, max(anneal_epochs, 1)
    if n <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if n == 1:
        return [1.0]
    non_final = max(1 / n - e / (n * big_e), 0.03 / n)
    final = min(1 / n + e * (n - 1) / (n * big_e), 1 - 0.03 * (n - 1) / n)
    return [non_final] * (n - 1) + [final]


class MAML(MetaLearner):
    """MAML with any inner rule (plain SGD by default)."""

    name = "maml"

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule | None = None,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        multi_step_loss: bool = False,
        msl_epochs: int = 10,
        epoch_iterations: int = 500,
        first_order_iterations: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(model, rule if rule is not None else SGD(inner_lr), inner_steps=inner_steps, **kwargs)
        if first_order:
            self.name = "fomaml"
        self.first_order = first_order
        self.multi_step_loss = multi_step_loss and inner_steps > 1
        self.msl_epochs = msl_epochs
        self.epoch_iterations = max(int(epoch_iterations), 1)
        self.first_order_iterations = int(first_order_iterations)

    def schedule(self, iteration: int) -> tuple[Tensor | None, bool]:
        first_order = self.first_order or iteration < self.first_order_iterations
        if not self.multi_step_loss:
            return None, first_order
        w = multi_step_weights(self.inner_steps, iteration // self.epoch_iterations, self.msl_epochs)
        ref = next(iter(self.params.values()))
        return torch.tensor(w, dtype=ref.dtype, device=ref.device), first_order

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sx, sy, qx, qy = task
        pre = self.loss(params, qx, qy)
        if self.inner_steps == 0:
            return pre, {"pre_loss": pre.detach(), "post_loss": pre.detach()}
        losses = []
        state = None
        for step in range(self.inner_steps):
            params, state = self.inner_step(params, meta, sx, sy, step, self.rule, first_order, state)
            if weights is not None or step == self.inner_steps - 1:
                losses.append(self.loss(params, qx, qy, step + 1))
        loss = (weights * torch.stack(losses)).sum() if weights is not None else losses[-1]
        return loss, {"pre_loss": pre.detach(), "post_loss": losses[-1].detach()}
