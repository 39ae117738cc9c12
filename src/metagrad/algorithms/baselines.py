"""The baselines of the MAML paper (Finn et al. 2017, section 5.1), as algorithms in their own right.

* ``Pretrain``: one network regressed on the points of every training task (no inner loop), then fine-tuned
  on a test task's K points with SGD at evaluation.
* ``Oracle``: a network that also receives each task's true amplitude and phase as inputs (use it with
  :class:`metagrad.tasks.OracleSinusoid`): the floor any method can approach.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import MetaLearner, Params, Task
from metagrad.inner.sgd import SGD

__all__ = ["Pretrain", "Oracle"]


class Pretrain(MetaLearner):
    """Plain multi-task regression on pooled support and query points; SGD fine-tuning at ``inner_lr``."""

    name = "pretrain"

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, **kwargs: Any) -> None:
        kwargs.pop("inner_steps", None)
        super().__init__(model, SGD(inner_lr), inner_steps=0, **kwargs)

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sx, sy, qx, qy = task
        loss = self.loss(params, torch.cat([sx, qx]), torch.cat([sy, qy]))
        return loss, {"pre_loss": loss.detach()}


class Oracle(Pretrain):
    """Regression with the task's true parameters as extra inputs (see ``OracleSinusoid``).

    It has nothing to adapt: its inner learning rate is 0, so its error is the same after any number of steps.
    """

    name = "oracle"

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs.pop("inner_lr", None)
        kwargs.pop("eval_rule", None)
        super().__init__(model, inner_lr=0.0, **kwargs)
