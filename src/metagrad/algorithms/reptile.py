"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018), batched form.

For each task of the meta-batch, run k inner steps from θ on mini-batches of the task's points (support and
query pooled: Reptile has no support/query split), then move θ towards the mean adapted weights:
``θ ← θ + ε·(mean φ − θ)``. That move is handed to the trainer as the "gradient" ``θ − mean φ`` of an outer
SGD step whose learning rate is ε (linear schedule from ``meta_lr`` to ``meta_lr_final`` in the config).
The inner optimizer is any inner rule: SGD, or :class:`metagrad.inner.Adam` with β1 = 0 as in the paper's
code; with ``persist_inner_state`` the rule's state (Adam's second-moment estimate) carries over between
meta-iterations (averaged over the tasks of the batch, which are adapted in parallel here rather than one after
another), held in ``extra_state`` so that a checkpoint keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import MetaLearner, Params, _detach
from metagrad.errors import ConfigError
from metagrad.inner.adam import Adam
from metagrad.inner.base import InnerRule
from metagrad.inner.sgd import SGD
from metagrad.registry import register_algorithm
from metagrad.tasks.base import TaskBatch, shard_bounds, shard_weight

__all__ = ["Reptile", "ReptileConfig", "INNER_OPTIMIZERS"]

INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class ReptileConfig:
    """``[algorithm]`` options of Reptile (``name = "reptile"``); the outer step size is ``train.meta_lr``."""

    inner_lr: float = 0.02
    inner_steps: int = 5
    eval_inner_lr: float | None = None
    inner_batch: int = 10
    inner_optimizer: str = "sgd"
    persist_inner_state: bool = True

    def validate(self, cfg: Any) -> None:
        if self.inner_steps == 0:
            raise ConfigError("algorithm.inner_steps must be positive for reptile")


@register_algorithm("reptile", config=ReptileConfig)
class Reptile(MetaLearner):
    """Reptile; evaluation adapts with plain SGD at ``inner_lr`` (or ``eval_rule``). ``rule`` overrides the inner
    optimizer that ``inner_optimizer`` names."""

    name = "reptile"

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule | None = None,
        *,
        inner_lr: float = 0.02,
        inner_steps: int = 5,
        inner_batch: int = 10,
        inner_optimizer: str = "sgd",
        persist_inner_state: bool = True,
        beta2: float = 0.999,
        eps: float = 1e-8,
        eval_rule: InnerRule | None = None,
        **kwargs: Any,
    ) -> None:
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if inner_batch <= 0:
            raise ValueError(f"inner_batch must be positive, got {inner_batch}")
        if rule is None:
            rule = Adam(inner_lr, beta1=0.0, beta2=beta2, eps=eps) if inner_optimizer == "adam" else SGD(inner_lr)
        eval_rule = eval_rule if eval_rule is not None else SGD(inner_lr)
        super().__init__(model, rule, inner_steps=inner_steps, eval_rule=eval_rule, **kwargs)
        self.inner_lr = float(inner_lr)
        self.inner_batch = int(inner_batch)
        self.inner_optimizer = inner_optimizer
        self.persist_inner_state = persist_inner_state
        for k, v in self.rule.init_state({k: p.detach() for k, p in self.params.items() if k in self.fast}).items():
            self.extra.add(k, v)

    @property
    def legacy_names(self) -> dict[str, str]:
        """Checkpoints from before inner rules carried state named the inner Adam's moments ``reptile.*``."""
        return {k: "reptile." + k.removeprefix("adam.") for k in self.extra_state if k.startswith("adam.")}

    @classmethod
    def from_config(cls, options: ReptileConfig, model: nn.Module, spec: Any) -> Reptile:
        if getattr(model, "per_step", False):
            raise ConfigError(
                "model.bn = 'per_step' indexes batch norm by MAML's inner step; reptile has none: use "
                "model.bn = 'transductive'"
            )
        o = options
        return cls(
            model,
            inner_lr=o.inner_lr,
            inner_steps=o.inner_steps,
            inner_batch=o.inner_batch,
            inner_optimizer=o.inner_optimizer,
            persist_inner_state=o.persist_inner_state,
            eval_rule=SGD(o.eval_inner_lr) if o.eval_inner_lr is not None else None,
            **cls.spec_options(spec),
        )

    def _adapt_task(
        self, params: Params, meta: Params, state: Params, task: tuple[Tensor, ...]
    ) -> tuple[Params, Params, Tensor, Tensor]:
        x, y, idx = task
        pre = self.loss(params, x, y)
        for s in range(self.inner_steps):
            params, state = self.inner_step(params, meta, x[idx[s]], y[idx[s]], s, self.rule, True, state)
        return params, state, pre, self.loss(params, x, y)

    def _reptile_step(
        self, params: Params, meta: Params, state: Params, tasks: tuple[Tensor, ...]
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        adapted, new_state, pre, post = self.map_tasks(self._adapt_task, (params, meta, state), tasks, "meta-gradient")
        delta = {k: params[k] - adapted[k].mean(0) for k in self.fast}
        return delta, {k: x.mean(0) for k, x in new_state.items()}, {"loss": post.mean(), "pre_loss": pre.mean()}

    def _compile_target(self) -> Any:
        return self._reptile_step

    @property
    def not_meta_learned(self) -> frozenset[str]:  # type: ignore[override]
        """The trainable parameters the inner loop does not adapt (``adapt_only``): Reptile moves only the adapted
        weights, so the others get no update."""
        fast = set(self.fast)
        return frozenset(n for n, p in self._named_parameters().items() if p.requires_grad and n not in fast)

    def _step_draws(self, tasks: int, points: int, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        # A fresh random mini-batch (without replacement) per task and inner step, from the trainer's stream.
        keys = torch.rand((tasks, self.inner_steps, points), generator=generator)
        return (keys.argsort(dim=-1)[..., : min(self.inner_batch, points)],)

    def _fused_gradient(
        self,
        learned: Params,
        frozen: Params,
        meta: Params,
        tasks: tuple[Tensor, ...],
        weights: Tensor | None,
        first_order: bool,
        scale: float,
        draws: tuple[Tensor, ...],
        extra: Params,
    ) -> tuple[Params, Params, dict[str, Tensor], Params]:
        # _meta_step's work for the whole batch in one process: the support and query points pooled.
        sx, sy, qx, qy = tasks
        x, y = torch.cat([sx, qx], dim=1), torch.cat([sy, qy], dim=1)
        delta, state, metrics = self._reptile_step({**frozen, **learned}, meta, extra, (x, y, *draws))
        return delta, {}, metrics, state if self.persist_inner_state else {}

    def _meta_step(
        self,
        batch: TaskBatch,
        iteration: int,
        generator: torch.Generator | None,
        shard: tuple[int, int],
        named: dict[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        meta: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        self._check_batch(batch, named)
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        b, n = x.shape[:2]
        (idx,) = self._step_draws(b, n, generator)
        idx = idx.to(x.device)
        scale = 1.0
        if shard[1] > 1:  # weighted so that the plain mean over the ranks is the whole batch's (uneven shards too)
            scale = shard_weight(b, shard[1], shard[0])
            part = slice(*shard_bounds(b, shard[1], shard[0]))
            x, y, idx = x[part], y[part], idx[part]
        state = _detach(self.extra_state)
        compiled = self._compiled is not None
        params = _detach(named if params is None else params)
        meta = _detach(self.meta_state if meta is None else meta)
        with self._explain_transform_errors(lambda: self._reptile_step(params, meta, state, (x, y, idx))):
            with self._task_randomness(generator, x.device, shard[0]):
                args = (params, meta, state, (x, y, idx))
                out = self._run_compiled(self._compiled, *args) if compiled else self._reptile_step(*args)
                delta, new_state, metrics = out
        if scale != 1.0:
            delta, new_state, metrics = ({k: v * scale for k, v in t.items()} for t in (delta, new_state, metrics))
        if self.persist_inner_state:
            for k, v in new_state.items():
                self.extra_state[k] = v.detach()
        return delta, {}, metrics
