"""The baselines of the MAML paper (Finn et al. 2017, section 5.1), as algorithms in their own right.

* ``Pretrain``: one network regressed on the points of every training task (no inner loop), then fine-tuned
  on a test task's K points with SGD at evaluation.
* ``Oracle``: a network that also receives each task's true amplitude and phase as inputs (use it with
  :class:`metagrad.tasks.OracleSinusoid`): the floor any method can approach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import MetaLearner, Params, Task
from metagrad.errors import ConfigError
from metagrad.inner.sgd import SGD
from metagrad.registry import register_algorithm

__all__ = ["Pretrain", "PretrainConfig", "Oracle", "OracleConfig"]


@dataclass
class PretrainConfig:
    """``[algorithm]`` options of the pretraining baseline (``name = "pretrain"``): fine-tuning's SGD rate."""

    inner_lr: float = 0.01
    eval_inner_lr: float | None = None


@dataclass
class OracleConfig:
    """The oracle baseline (``name = "oracle"``) has no options."""


@register_algorithm("pretrain", config=PretrainConfig)
class Pretrain(MetaLearner):
    """Plain multi-task regression on pooled support and query points; SGD fine-tuning at ``inner_lr``."""

    name = "pretrain"

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.01, **kwargs: Any) -> None:
        kwargs.pop("inner_steps", None)
        super().__init__(model, SGD(inner_lr), inner_steps=0, **kwargs)

    @classmethod
    def from_config(cls, options: Any, model: nn.Module, spec: Any) -> MetaLearner:
        lr = getattr(options, "inner_lr", 0.0)
        eval_lr = getattr(options, "eval_inner_lr", None)
        return cls(
            model,
            inner_lr=lr,
            eval_rule=SGD(eval_lr) if eval_lr is not None else None,
            **cls.spec_options(spec),
        )

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sx, sy, qx, qy = task
        loss = self.loss(params, torch.cat([sx, qx]), torch.cat([sy, qy]))
        return loss, {"pre_loss": loss.detach()}


@register_algorithm("oracle", config=OracleConfig)
class Oracle(Pretrain):
    """Regression with the task's true parameters as extra inputs (see ``OracleSinusoid``).

    It has nothing to adapt: its inner learning rate is 0, so its error is the same after any number of steps.
    """

    name = "oracle"

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs.pop("inner_lr", None)
        kwargs.pop("eval_rule", None)
        super().__init__(model, inner_lr=0.0, **kwargs)

    @staticmethod
    def wrap_task(task: Any) -> Any:
        """The oracle sees each task's true parameters: the sinusoid family with ``[x, A, φ]`` inputs."""
        from metagrad.tasks.sinusoid import OracleSinusoid, Sinusoid

        if type(task) is not Sinusoid:
            raise ConfigError("the oracle baseline exists for the sinusoid task only")
        return OracleSinusoid(task.amplitude, task.phase, task.x_range, task.noise)
