"""The house check of a meta-gradient, shared by the test files: vmap == loop, and both == a float64 central
difference of the meta-loss along a random direction in (params, meta-state)."""

from __future__ import annotations

import torch

from metagrad.algorithms.base import MetaLearner
from metagrad.tasks.base import TaskBatch


def assert_vmap_equals_loop(vec: dict, loop: dict, rel: float = 1e-9) -> float:
    """Every entry of ``vec`` equals ``loop``'s to ``rel`` of the largest entry; returns that largest entry."""
    scale = max(g.abs().max() for g in loop.values())
    for k in loop:
        torch.testing.assert_close(vec[k], loop[k], rtol=0, atol=rel * scale, msg=lambda m, k=k: f"{k}: {m}")
    return float(scale)


def central_difference(
    learner: MetaLearner, batch: TaskBatch, gp: dict, gm: dict, *, seed: int = 2, unit: bool = False, h: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(analytic, finite-difference) directional derivatives of ``learner``'s meta-loss at its own parameters,
    along a random direction (``unit``: normalised, so that a step of ``h`` crosses no kink of ReLU or pooling)."""
    weights, first_order = learner.schedule(0)
    tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    g = torch.Generator().manual_seed(seed)
    dtype = next(iter(learner.params.values())).dtype
    dp = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in learner.params.items()}
    dm = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in learner.meta_state.items()}
    if unit:
        norm = torch.sqrt(sum((d**2).sum() for d in [*dp.values(), *dm.values()]))
        dp, dm = {k: v / norm for k, v in dp.items()}, {k: v / norm for k, v in dm.items()}

    def f(t: float) -> torch.Tensor:
        p = {k: v + t * dp[k] for k, v in learner.params.items()}
        m = {k: v + t * dm[k] for k, v in learner.meta_state.items()}
        with torch.no_grad():
            return learner.meta_loss(p, m, tasks, weights, first_order)[0]

    fd = (f(h) - f(-h)) / (2 * h)
    analytic = sum((gp[k] * dp[k]).sum() for k in dp) + sum((gm[k] * dm[k]).sum() for k in dm)
    return analytic, fd
