"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018), batched form.

For each task of the meta-batch, run k inner steps from θ on mini-batches of the task's points (support and
query pooled: Reptile has no support/query split), then move θ towards the mean adapted weights:
``θ ← θ + ε·(mean φ − θ)``. That move is handed to the trainer as the "gradient" ``θ − mean φ`` of an outer
SGD step whose learning rate is ε (linear schedule from ``meta_lr`` to ``meta_lr_final`` in the config).
The inner optimizer is SGD, or Adam with β1 = 0 as in the paper's code; with ``persist_inner_state`` its
second-moment estimate carries over between meta-iterations (averaged over the tasks of the batch, which
are adapted in parallel here rather than one after another).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad

from metagrad.algorithms.base import MetaLearner, Params, _detach
from metagrad.inner.sgd import SGD
from metagrad.tasks.base import TaskBatch

__all__ = ["Reptile", "INNER_OPTIMIZERS"]

INNER_OPTIMIZERS = ("sgd", "adam")


class Reptile(MetaLearner):
    """Reptile; evaluation adapts with plain SGD at ``inner_lr``."""

    name = "reptile"

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float = 0.02,
        inner_steps: int = 5,
        inner_batch: int = 10,
        inner_optimizer: str = "sgd",
        persist_inner_state: bool = True,
        beta2: float = 0.999,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, SGD(inner_lr), inner_steps=inner_steps, **kwargs)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if inner_batch <= 0:
            raise ValueError(f"inner_batch must be positive, got {inner_batch}")
        self.inner_lr = float(inner_lr)
        self.inner_batch = int(inner_batch)
        self.inner_optimizer = inner_optimizer
        self.persist_inner_state = persist_inner_state
        self.beta2, self.eps = beta2, eps
        if inner_optimizer == "adam":
            for k, v in self.params.items():
                self.extra.add(f"reptile.v.{k}", torch.zeros_like(v))
            self.extra.add("reptile.t", torch.zeros((), dtype=next(iter(self.params.values())).dtype))

    def _adapt_task(
        self, params: Params, v: Params, t: Tensor, task: tuple[Tensor, ...]
    ) -> tuple[Params, Params, Tensor, Tensor]:
        x, y, idx = task
        pre = self.loss(params, x, y)
        fast = self.fast
        for s in range(self.inner_steps):
            xs, ys = x[idx[s]], y[idx[s]]
            g = grad(lambda f, p=params, xs=xs, ys=ys: self.loss({**p, **f}, xs, ys))({k: params[k] for k in fast})
            if self.inner_optimizer == "sgd":
                params = {**params, **{k: params[k] - self.inner_lr * g[k] for k in fast}}
                continue
            step_t = t + s + 1
            v = {**v, **{k: self.beta2 * v[k] + (1 - self.beta2) * g[k] ** 2 for k in fast}}
            correction = 1 - self.beta2**step_t
            update = {k: params[k] - self.inner_lr * g[k] / ((v[k] / correction).sqrt() + self.eps) for k in fast}
            params = {**params, **update}
        return params, v, pre, self.loss(params, x, y)

    def _reptile_step(
        self, params: Params, v: Params, t: Tensor, tasks: tuple[Tensor, ...]
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        adapted, new_v, pre, post = self.map_tasks(self._adapt_task, (params, v, t), tasks)
        delta = {k: params[k] - adapted[k].mean(0) for k in self.fast}
        return delta, {k: x.mean(0) for k, x in new_v.items()}, {"loss": post.mean(), "pre_loss": pre.mean()}

    def compile(self, **options: Any) -> None:
        self._compiled = torch.compile(self._reptile_step, **options)

    def meta_gradient(
        self,
        batch: TaskBatch,
        iteration: int,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        **_: Any,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        self.check_batch(batch)
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        b, n = x.shape[:2]
        mb = min(self.inner_batch, n)
        # A fresh random mini-batch (without replacement) per task and inner step, from the trainer's stream.
        keys = torch.rand((b, self.inner_steps, n), generator=generator)
        idx = keys.argsort(dim=-1)[..., :mb].to(x.device)
        if shard[1] > 1:
            if b % shard[1]:
                raise ValueError(f"cannot split {b} tasks into {shard[1]} equal shards")
            size = b // shard[1]
            part = slice(shard[0] * size, (shard[0] + 1) * size)
            x, y, idx = x[part], y[part], idx[part]
        adam = self.inner_optimizer == "adam"
        t = self.extra_state["reptile.t"] if adam else torch.zeros((), device=x.device)
        v = (
            {k: self.extra_state[f"reptile.v.{k}"] for k in self.params}
            if adam
            else {k: torch.zeros((), device=x.device) for k in self.params}
        )
        fn = self._compiled or self._reptile_step
        delta, new_v, metrics = fn(_detach(self.params), v, t, (x, y, idx))
        if adam and self.persist_inner_state:
            for k in self.params:
                self.extra_state[f"reptile.v.{k}"] = new_v[k].detach()
            self.extra_state["reptile.t"] = t + self.inner_steps
        return delta, {}, metrics
