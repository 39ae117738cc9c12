"""MetaLearner: one pure per-task function, mapped over the task batch with ``torch.func.vmap``.

Subclasses write ``task_loss(params, meta, task, weights, first_order)`` for a single task; this base class
maps it over a batch (vmap, or a plain loop with the same numbers), differentiates it with
``torch.func.grad_and_value`` (exact second order unless ``first_order``), optionally through
``torch.compile``, and provides ``adapt``/``predict`` and the adaptation curves used by evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from metagrad.inner.base import InnerRule, Params
from metagrad.models.norm import make_exact
from metagrad.models.norm import statistics as norm_statistics
from metagrad.tasks.base import TaskBatch

__all__ = ["MetaLearner", "LOSSES", "METRICS", "Task"]

Task = tuple[Tensor, Tensor, Tensor, Tensor]  # support_x, support_y, query_x, query_y of one task

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
}


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).to(logits.dtype).mean()


# What evaluation reports for each loss: the loss itself for regression, accuracy for classification.
METRICS: dict[str, tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "mse": ("mse", F.mse_loss),
    "cross_entropy": ("accuracy", _accuracy),
}


def _detach(tree: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in tree.items()}


class MetaLearner:
    """Shared machinery of every algorithm. ``params`` and ``meta_state`` are plain tensors that the trainer
    updates; ``extra_state`` holds non-learned state that must survive a checkpoint (e.g. Reptile's Adam
    moments)."""

    name = "meta-learner"

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule,
        *,
        inner_steps: int,
        loss: str = "mse",
        vectorize: bool = True,
        eval_rule: InnerRule | None = None,
        adapt_only: Sequence[str] | None = None,
    ) -> None:
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        make_exact(model)  # PyTorch's batch/layer norm kernels are wrong under vmap of grad of grad
        self.model = model
        self.rule = rule
        self.eval_rule = eval_rule if eval_rule is not None else rule
        self.inner_steps = int(inner_steps)
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        self.vectorize = vectorize
        self.metric_name, self.metric_fn = METRICS[loss]
        self.params: Params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers: Params = dict(model.named_buffers())
        # A model whose forward takes the inner step (Conv4 with per-step batch norm, MAML++).
        self.per_step = bool(getattr(model, "per_step", False))
        # How such a model normalises *query* images in evaluation: with the query batch's statistics ("batch",
        # MAML++) or the running ones ("running": each query on its own). Adaptation always normalises the
        # support set with its own statistics, as in training.
        self.query_statistics = "batch"
        # The parameters adapted in the inner loop: all, or those under the given prefixes (ANIL: the head),
        # less those the model meta-learns in the outer loop only (per-step batch norm).
        meta_only = tuple(getattr(model, "meta_only", ()))
        self.fast = [
            n
            for n in self.params
            if (adapt_only is None or any(n.startswith(p) for p in adapt_only))
            and not any(n.startswith(m) for m in meta_only)
        ]
        if not self.fast:
            raise ValueError(f"adapt_only={list(adapt_only or [])} matches no parameter of {sorted(self.params)}")
        self.meta_state: Params = rule.init({n: self.params[n] for n in self.fast})
        self.extra_state: Params = {}
        self._compiled: Callable[..., Any] | None = None

    # ----- pure functions of (params, ...) ------------------------------------------------------------
    def forward(
        self, params: Mapping[str, Tensor], x: Tensor, step: int = 0, statistics: str = "batch", track: bool = False
    ) -> Tensor:
        """The network with ``params`` on ``x``. ``statistics`` picks the batch norms' normalisation (``"batch"``
        or ``"running"``, for layers that have running statistics) and ``track`` whether this pass updates them
        (only ever outside the transforms). Per-step batch norm: ``step`` (inner steps taken so far) selects the
        rows."""
        if self.per_step:
            options = {"step": step, "statistics": statistics, "track": track}
            return functional_call(self.model, (dict(params), self.buffers), (x,), options)
        with norm_statistics(statistics, track):
            return functional_call(self.model, (dict(params), self.buffers), (x,))

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        return self.loss_fn(self.forward(params, x, step), y)

    def inner_step(
        self,
        params: Params,
        meta: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        step: int,
        rule: InnerRule,
        first_order: bool,
    ) -> Params:
        """One inner update ``θ ← θ − rule(∇θ L_support, step)`` of the adapted (``fast``) parameters."""

        def support_loss(fast: Params) -> Tensor:
            return self.loss({**params, **fast}, x, y, step)

        g = grad(support_loss)({k: params[k] for k in self.fast})
        if first_order:
            # First-order MAML: the adapted weights depend on θ only through the identity path.
            g = _detach(g)
        update = rule.update(g, step, meta)
        return {**params, **{k: params[k] - update[k] for k in self.fast}}

    def metric(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        """What evaluation reports on query points: the MSE for regression, accuracy for classification."""
        return self.metric_fn(self.forward(params, x, step, self.query_statistics), y)

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outer loss of one task and detached diagnostics; written by each algorithm."""
        raise NotImplementedError

    # ----- batching ---------------------------------------------------------------------------------
    def map_tasks(self, fn: Callable[..., Any], shared: tuple, tasks: tuple[Tensor, ...]) -> Any:
        """``fn(*shared, tasks_i)`` for every task i, stacked: vmap, or a plain loop with the same numbers."""
        if self.vectorize:
            in_dims = (None,) * len(shared) + (0,)
            return vmap(fn, in_dims=in_dims, randomness="error")(*shared, tasks)
        outs = [fn(*shared, tuple(t[i] for t in tasks)) for i in range(tasks[0].shape[0])]
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    def meta_loss(
        self, params: Params, meta: Params, tasks: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        def one(p: Params, m: Params, w: Tensor | None, task: Task) -> tuple[Tensor, dict[str, Tensor]]:
            return self.task_loss(p, m, task, w, first_order)

        losses, aux = self.map_tasks(one, (params, meta, weights), tasks)
        return losses.mean(), {k: v.mean() for k, v in aux.items()}

    def _meta_gradient(
        self, params: Params, meta: Params, tasks: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        (gp, gm), (loss, aux) = grad_and_value(self.meta_loss, argnums=(0, 1), has_aux=True)(
            params, meta, tasks, weights, first_order
        )
        return gp, gm, {"loss": loss, **aux}

    # ----- what the trainer calls ---------------------------------------------------------------------
    def schedule(self, iteration: int) -> tuple[Tensor | None, bool]:
        """Per-iteration training options: multi-step loss weights and whether to use first order."""
        return None, False

    def compile(self, **options: Any) -> None:
        """Run the meta-gradient through ``torch.compile`` from now on."""
        self._compiled = torch.compile(self._meta_gradient, **options)

    def meta_gradient(
        self,
        batch: TaskBatch,
        iteration: int,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """Gradients of the meta-loss with respect to ``params`` and ``meta_state``, plus metrics.

        ``shard=(rank, world)`` computes them on that rank's share of the tasks (distributed training): any
        randomness is drawn for the whole batch first, so the ranks together match one process."""
        weights, first_order = self.schedule(iteration)
        if shard[1] > 1:
            batch = batch.split(shard[1], shard[0])
        fn = self._compiled or self._meta_gradient
        tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return fn(self.params, self.meta_state, tasks, weights, first_order)

    # ----- adaptation and evaluation ----------------------------------------------------------------
    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int | None = None,
        params: Params | None = None,
    ) -> Params:
        """Adapt to one task's support points ([K, ...]) with the learned inner rule; returns new weights."""
        steps = self.inner_steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        p = _detach(self.params if params is None else params)
        for s in range(steps):
            p = _detach(self.inner_step(p, self.meta_state, support_x, support_y, s, self.eval_rule, True))
        return p

    @torch.no_grad()
    def predict(self, x: Tensor, params: Params | None = None, step: int | None = None) -> Tensor:
        """The network's output on ``x`` with ``params`` (default: the meta-learned initialisation).

        ``step`` matters only for per-step batch norm: the number of inner steps that produced ``params``
        (default 0 for the initialisation, ``inner_steps`` for adapted weights, as :meth:`adapt` takes); ``x`` is
        normalised as a query batch (``query_statistics``)."""
        if step is None:
            step = 0 if params is None else self.inner_steps
        return self.forward(self.params if params is None else params, x, step, self.query_statistics)

    def _curve(self, params: Params, meta: Params, steps: int, task: Task) -> Tensor:
        sx, sy, qx, qy = task
        values = [self.metric(params, qx, qy)]
        for s in range(steps):
            params = _detach(self.inner_step(params, meta, sx, sy, s, self.eval_rule, True))
            values.append(self.metric(params, qx, qy, s + 1))
        return torch.stack(values).detach()

    def adaptation_curve(self, batch: TaskBatch, steps: int, chunk: int | None = None) -> Tensor:
        """The metric (query MSE, or accuracy) of every task after 0..steps inner steps: [B, steps + 1]."""
        if chunk is None:  # bound the activations of one vmapped chunk (images are far larger than points)
            per_task = batch.support_x[0].numel() + batch.query_x[0].numel()
            chunk = max(1, min(200, 400_000 // per_task))
        out = []
        for start in range(0, len(batch), chunk):
            b = batch[start : start + chunk]
            tasks = (b.support_x, b.support_y, b.query_x, b.query_y)
            out.append(self.map_tasks(self._curve, (_detach(self.params), _detach(self.meta_state), steps), tasks))
        return torch.cat(out)

    @torch.no_grad()
    def track_statistics(self, batch: TaskBatch, tasks: int = 4) -> None:
        """Fold the per-step batch statistics of the first ``tasks`` tasks into the model's running statistics.

        Per-step batch norm only (a no-op otherwise); the trainer calls it after each meta-step. Each task is
        adapted as in training; step ``s`` sees the support set under the weights after ``s`` steps, and the last
        step the query set, which is what those rows normalise in training. Plain forward passes outside every
        transform, so the running statistics are ordinary in-place buffer updates (identical on every rank)."""
        if not (self.per_step and self.buffers):
            return
        for i in range(min(int(tasks), len(batch))):
            sx, sy, qx = batch.support_x[i], batch.support_y[i], batch.query_x[i]
            p = _detach(self.params)
            for s in range(self.inner_steps):
                self.forward(p, sx, s, track=True)
                p = _detach(self.inner_step(p, self.meta_state, sx, sy, s, self.rule, True))
            self.forward(p, qx, self.inner_steps, track=True)

    # ----- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Params]:
        return {"params": self.params, "meta": self.meta_state, "extra": self.extra_state, "buffers": self.buffers}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MetaLearner:
        self.model.to(device=device, dtype=dtype)  # ``self.buffers`` may hold loaded values: moved below
        for tree in self.state_tensors().values():
            for k, v in tree.items():
                tree[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return self
