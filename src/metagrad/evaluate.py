"""The one evaluator: fixed seeded test tasks, adapt 0..N steps, mean MSE ± 95 % CI at every step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from metagrad.algorithms import MetaLearner
from metagrad.tasks import Sinusoid, TaskBatch

__all__ = ["TEST_SEED", "VAL_SEED", "fixed_tasks", "evaluate", "summarize", "format_table"]

# Evaluation streams are seeded independently of the training seed (which config validation keeps below
# 10**9), so every run of every algorithm is scored on the same tasks and none of them is trained on.
TEST_SEED = 1_000_000_007
VAL_SEED = 1_000_000_009


def fixed_tasks(dist: Sinusoid, n: int, shots: int, scoring: str, seed: int = TEST_SEED) -> TaskBatch:
    """The fixed evaluation set for ``shots``: dense scoring uses the 100-point grid, paper scoring K
    query points drawn like the support (the MAML authors' code)."""
    g = torch.Generator().manual_seed(seed * 1009 + shots * 2 + (scoring == "paper"))
    return dist.sample(n, shots, shots, g, scoring=scoring)


def summarize(losses: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and 95 % CI half-width (1.96·σ/√n, σ with Bessel's correction) of [n, steps + 1] losses.

    A task whose adaptation diverged makes the mean and CI of that step non-finite, on purpose: a mean over
    the surviving tasks would hide the failure. ``evaluate`` counts such tasks separately.
    """
    n = losses.shape[0]
    mean = losses.double().mean(0)
    sd = losses.double().std(0, unbiased=True) if n > 1 else torch.zeros_like(mean)
    return mean.tolist(), (1.96 * sd / math.sqrt(n)).tolist()


def evaluate(
    learner: MetaLearner,
    dist: Sinusoid,
    shots: Sequence[int] = (5, 10, 20),
    steps: int = 10,
    tasks: int = 600,
    scoring: str = "dense",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = TEST_SEED,
) -> dict[str, Any]:
    """Evaluate a learner; returns the JSON-ready result of ``metagrad eval``."""
    results = []
    for k in shots:
        batch = fixed_tasks(dist, tasks, int(k), scoring, seed).to(device, dtype)
        curve = learner.adaptation_curve(batch, steps).cpu()
        mean, ci = summarize(curve)
        diverged = (~torch.isfinite(curve)).sum(0).tolist()
        entry = {"shots": int(k), "steps": list(range(steps + 1)), "mse": mean, "ci95": ci, "diverged": diverged}
        results.append(entry)
    return {
        "algorithm": learner.name,
        "task": dist.name,
        "scoring": scoring,
        "tasks": tasks,
        "results": results,
    }


def format_table(result: dict[str, Any], columns: Sequence[int] | None = None) -> str:
    """A plain-text table: one row per shot count, MSE ± CI after the chosen steps."""
    steps = result["results"][0]["steps"]
    cols = list(columns) if columns is not None else sorted({0, 1, min(5, steps[-1]), steps[-1]})
    head = f"{'shots':>5} | " + " | ".join(f"{f'step {s}':>17}" for s in cols)
    lines = [
        f"{result['algorithm']} on {result['task']}, {result['tasks']} tasks, {result['scoring']} scoring",
        head,
    ]
    lines.append("-" * len(head))
    for r in result["results"]:
        cells = [f"{r['mse'][s]:>8.4f} ± {r['ci95'][s]:<6.4f}" for s in cols]
        lines.append(f"{r['shots']:>5} | " + " | ".join(cells))
    for r in result["results"]:
        bad = [(s, d) for s, d in zip(r["steps"], r.get("diverged", []), strict=False) if d]
        if bad:
            s, d = bad[0]
            lines.append(
                f"note: {r['shots']}-shot adaptation diverged (NaN/inf) on {d} of {result['tasks']} tasks from step "
                f"{s} on; the mean includes them (the inner learning rate is too high for that many steps)"
            )
    return "\n".join(lines)
