"""The one evaluator: fixed seeded test tasks, adapt 0..N steps, mean MSE ± 95 % CI at every step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from metagrad.algorithms import MetaLearner
from metagrad.errors import ConfigError
from metagrad.tasks import TaskBatch, TaskDistribution

__all__ = [
    "TEST_SEED", "VAL_SEED", "LAKE_PUBLISHED", "fixed_tasks", "evaluate", "evaluate_lake_runs", "summarize",
    "format_table",
    "format_lake_table",
    "set_bn_statistics",
]  # fmt: skip

# Error rates on the 20 one-shot runs, Lake, Salakhutdinov & Tenenbaum, Science 2015.
LAKE_PUBLISHED = {
    "people": 0.045,
    "Bayesian Program Learning": 0.033,
    "deep Siamese convnet": 0.080,
    "affine model": 0.182,
    "hierarchical deep": 0.348,
}

# Evaluation streams are seeded independently of the training seed (which config validation keeps below
# 10**9), so every run of every algorithm is scored on the same tasks and none of them is trained on.
TEST_SEED = 1_000_000_007
VAL_SEED = 1_000_000_009


def fixed_tasks(
    dist: TaskDistribution, n: int, shots: int, scoring: str = "dense", seed: int = TEST_SEED, queries: int = 15
) -> TaskBatch:
    """The fixed evaluation set for ``shots``: the family's ``evaluation_tasks`` for ``scoring`` if it has one
    (sinusoid: dense scoring uses the 100-point grid, paper scoring K query points drawn like the support), else
    ``sample`` with ``queries`` (per class)."""
    g = torch.Generator().manual_seed(seed * 1009 + shots * 2 + (scoring == "paper"))
    if hasattr(dist, "evaluation_tasks"):
        return dist.evaluation_tasks(n, shots, queries, scoring, g)
    try:
        return dist.sample(n, shots, queries, g)
    except ValueError as e:  # e.g. more shots + queries than a class has images
        raise ConfigError(f"cannot draw {shots}-shot test tasks with {queries} queries per class: {e}") from None


def summarize(losses: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and 95 % CI half-width (1.96·σ/√n, σ with Bessel's correction) of [n, steps + 1] losses.

    A task whose adaptation diverged makes the mean and CI of that step non-finite, on purpose: a mean over
    the surviving tasks would hide the failure. ``evaluate`` counts such tasks separately.
    """
    n = losses.shape[0]
    mean = losses.double().mean(0)
    sd = losses.double().std(0, unbiased=True) if n > 1 else torch.zeros_like(mean)
    return mean.tolist(), (1.96 * sd / math.sqrt(n)).tolist()


def set_bn_statistics(learner: MetaLearner, statistics: str) -> None:
    """Normalise a per-step-BN learner's query images with the query batch's statistics (``"batch"``, MAML++,
    transductive) or the running ones (``"running"``: inductive, each query on its own). Adaptation normalises
    the support set with its own statistics either way. ``"batch"`` is all other models can do."""
    from metagrad.models.conv4 import BN_STATISTICS

    if statistics not in BN_STATISTICS:
        raise ConfigError(f"bn statistics must be one of {', '.join(BN_STATISTICS)}, got {statistics!r}")
    if statistics != "batch" and not learner.tracks_statistics:
        raise ConfigError(
            f"bn statistics {statistics!r} need a model with batch-norm running statistics (model.bn = 'per_step', "
            "or a BatchNorm with track_running_stats=True)"
        )
    learner.query_statistics = statistics


def _bn_mode(learner: MetaLearner) -> dict[str, str]:
    return {"bn_statistics": learner.query_mode()} if learner.tracks_statistics else {}


def evaluate(
    learner: MetaLearner,
    dist: TaskDistribution,
    shots: Sequence[int] = (5, 10, 20),
    steps: int = 10,
    tasks: int = 600,
    scoring: str = "dense",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = TEST_SEED,
    queries: int = 15,
) -> dict[str, Any]:
    """Evaluate a learner; returns the JSON-ready result of ``metagrad eval``: per shot count, the mean of the
    learner's metric (``mse``, or ``accuracy`` for classification) and its 95 % CI after 0..steps steps."""
    results = []
    metric = learner.metric_name
    for k in shots:
        batch = fixed_tasks(dist, tasks, int(k), scoring, seed, queries).to(device, dtype)
        curve = learner.adaptation_curve(batch, steps).cpu()
        mean, ci = summarize(curve)
        diverged = (~torch.isfinite(curve)).sum(0).tolist()
        # The curve's own width: an algorithm without an inner loop (ProtoNets) reports one point, step 0.
        entry = {"shots": int(k), "steps": list(range(curve.shape[1])), metric: mean, "ci95": ci, "diverged": diverged}
        results.append(entry)
    name = getattr(dist, "name", type(dist).__name__)
    out = {"algorithm": learner.name, "task": name, "scoring": scoring, "tasks": tasks, "results": results}
    if metric != "mse":
        scoring = scoring if hasattr(dist, "evaluation_tasks") else "query"
        out = {**out, "metric": metric, "scoring": scoring, "ways": getattr(dist, "ways", None), **_bn_mode(learner)}
    return out


def format_table(result: dict[str, Any], columns: Sequence[int] | None = None) -> str:
    """A plain-text table: one row per shot count, MSE ± CI after the chosen steps."""
    steps = result["results"][0]["steps"]
    cols = list(columns) if columns is not None else sorted({0, 1, min(5, steps[-1]), steps[-1]})
    cols = [c for c in cols if c <= steps[-1]]  # no inner loop (ProtoNets): the one point, step 0
    metric = result.get("metric", "mse")
    if metric == "accuracy":
        return _format_accuracy(result, cols)
    head = f"{'shots':>5} | " + " | ".join(f"{f'step {s}':>17}" for s in cols)
    lines = [
        f"{result['algorithm']} on {result['task']}, {result['tasks']} tasks, {result['scoring']} scoring",
        head,
    ]
    lines.append("-" * len(head))
    for r in result["results"]:
        cells = [f"{r[metric][s]:>8.4f} ± {r['ci95'][s]:<6.4f}" for s in cols]
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


def _format_accuracy(result: dict[str, Any], cols: Sequence[int]) -> str:
    ways = result.get("ways")
    head = f"{'shots':>5} | " + " | ".join(f"{f'step {s}':>15}" for s in cols)
    title = f"{result['algorithm']} on {result['task']}, {ways}-way, {result['tasks']} episodes: accuracy (%)"
    if "bn_statistics" in result:
        title += f", {result['bn_statistics']} BN statistics"
    lines = [title, head, "-" * len(head)]
    for r in result["results"]:
        cells = [f"{100 * r['accuracy'][s]:>6.2f} ± {100 * r['ci95'][s]:<5.2f}" for s in cols]
        lines.append(f"{r['shots']:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def evaluate_lake_runs(
    learner: MetaLearner,
    runs: Sequence[Any],
    steps: int = 10,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Lake et al.'s 20 one-shot runs: adapt on each run's 20 training images (one per class), classify its 20
    test items; error rate ± 95 % CI over the 20 runs after 0..steps inner steps."""
    from metagrad.errors import RunError
    from metagrad.tasks.omniglot import lake_task_batch

    batch = lake_task_batch(runs).to(device, dtype)
    # A metric learner (ProtoNets) knows its ways; its network's outputs are an embedding.
    ways = getattr(learner, "ways", None) or learner.predict(batch.support_x[0]).shape[-1]
    if ways != batch.support_x.shape[1]:
        raise RunError(
            f"the omniglot-runs benchmark is {batch.support_x.shape[1]}-way one-shot, but this run's model has "
            f"{ways} outputs: train it with task.ways={batch.support_x.shape[1]}"
        )
    accuracy = learner.adaptation_curve(batch, steps).cpu()
    mean, ci = summarize(1 - accuracy)
    return {
        "algorithm": learner.name, "task": "omniglot-runs", "metric": "error", "runs": len(runs),
        "steps": list(range(accuracy.shape[1])), "error": mean, "ci95": ci, "published": LAKE_PUBLISHED,
        **_bn_mode(learner),
    }  # fmt: skip


def format_lake_table(result: dict[str, Any]) -> str:
    steps = result["steps"]
    cols = sorted({0, min(1, steps[-1]), min(5, steps[-1]), steps[-1]})
    lines = [f"{result['algorithm']} on Lake et al.'s {result['runs']} one-shot runs (20-way): error rate (%)"]
    lines.append(" | ".join(f"step {s}: {100 * result['error'][s]:.1f} ± {100 * result['ci95'][s]:.1f}" for s in cols))
    lines.append("published: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in result["published"].items()))
    return "\n".join(lines)
