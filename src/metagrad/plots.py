"""Matplotlib figures: adaptation curves with 95 % CI bands and example fits (MAML paper, Figure 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# No matplotlib.use(...) here: forcing a backend on import would silence figures in notebooks, and
# matplotlib already falls back to Agg where there is no display.
import matplotlib.pyplot as plt
import torch

from metagrad.algorithms import MetaLearner
from metagrad.evaluate import fixed_tasks
from metagrad.tasks import Sinusoid

__all__ = ["plot_curves", "draw_curves", "draw_fit", "plot_eval", "plot_fits"]


def draw_curves(ax: Any, curves: Sequence[tuple[str, dict[str, Any]]], log: bool = True) -> None:
    """Mean MSE against inner steps with a shaded 95 % CI, one line per (label, result-entry)."""
    first = curves[0][1] if curves else {}
    metric = next((k for k in first if k not in ("shots", "steps", "ci95", "diverged")), "mse")
    log = log and metric != "accuracy"
    for label, r in curves:
        steps = r["steps"]
        mean, ci = torch.tensor(r[metric]), torch.tensor(r["ci95"])
        if len(steps) == 1:  # no inner loop (ProtoNets): one point with its CI, not a flat curve
            ax.errorbar(steps, mean, yerr=ci, fmt="D", ms=6, capsize=4, label=f"{label} (no inner loop)")
            continue
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=label)
        lo = (mean - ci).clamp_min(1e-6) if log else mean - ci
        ax.fill_between(steps, lo, mean + ci, color=line.get_color(), alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")
        # A single diverged test task sends a mean to 1e6 and flattens every other curve: cap the frame.
        start = max(torch.tensor(r[metric][0]).item() for _, r in curves)
        if ax.get_ylim()[1] > 30 * start:
            ax.set_ylim(top=30 * start)
            ax.text(0.02, 0.98, "curves leaving the frame diverged on some tasks", transform=ax.transAxes,
                    va="top", fontsize=7, color="0.3")  # fmt: skip
    ax.set_xlabel("inner gradient steps at test time")
    names = {"mse": "mean squared error", "accuracy": "query accuracy"}
    ax.set_ylabel(f"{names.get(metric, metric)} (mean ± 95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_curves(results: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """One panel per shot count, one line per algorithm (``results`` are ``evaluate`` outputs)."""
    shots = [r["shots"] for r in results[0]["results"]]
    fig, axes = plt.subplots(1, len(shots), figsize=(4.6 * len(shots), 4), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], shots, strict=True):
        draw_curves(ax, [(res["algorithm"], next(r for r in res["results"] if r["shots"] == k)) for res in results])
        ax.set_title(f"{k}-shot, {results[0]['scoring']} scoring, {results[0]['tasks']} tasks")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def draw_fit(
    ax: Any, learner: MetaLearner, dist: Sinusoid, task: Any, steps: Sequence[int] = (0, 1, 10), legend: bool = True
) -> None:
    """True curve, support points and the learner's prediction after each of ``steps`` inner steps."""
    grid = torch.linspace(*dist.x_range, 200, dtype=task.support_x.dtype, device=task.support_x.device)[:, None]
    truth = dist.curve(grid[None].cpu().double(), {k: v.cpu().double() for k, v in task.info.items()})
    ax.plot(grid.cpu(), truth[0], color="black", lw=2, label="ground truth")
    inputs = dist.inputs(grid[None], task.info)[0] if hasattr(dist, "inputs") else grid  # the oracle adds inputs
    for s in sorted(set(steps)):
        # From the initialisation each time: learned per-step rates depend on the step index.
        adapted = learner.adapt(task.support_x[0], task.support_y[0], steps=s)
        style = "--" if s == 0 else "-"
        label = "pre-update" if s == 0 else f"after {s} step{'s' if s > 1 else ''}"
        ax.plot(grid.cpu(), learner.predict(inputs, adapted).cpu(), style, lw=1.4, label=label)
    ax.scatter(task.support_x[0, :, 0].cpu(), task.support_y[0].cpu(), marker="^", color="red", zorder=5,
               label=f"{task.support_x.shape[1]} support points")  # fmt: skip
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="lower left")


def plot_eval(
    result: dict[str, Any], learner: MetaLearner, dist: Sinusoid, path: str | Path, examples: int = 3
) -> Path:
    """``metagrad eval --plot``: MSE against steps (all shot counts) beside example fits."""
    steps = result["results"][0]["steps"][-1]
    k = result["results"][0]["shots"]
    if not hasattr(dist, "curve"):
        examples = 0  # example fits are curves: only a 1-D regression family that can draw its own has them
    fig, axes = plt.subplots(1, 1 + examples, figsize=(4.4 * (1 + examples), 4), squeeze=False)
    axes = axes[0]
    draw_curves(axes[0], [(f"{r['shots']}-shot", r) for r in result["results"]])
    axes[0].set_title(f"{result['algorithm']}: {result['scoring']} scoring, {result['tasks']} tasks")
    device = next(iter(learner.params.values())).device
    dtype = next(iter(learner.params.values())).dtype
    tasks = fixed_tasks(dist, examples, k, "dense").to(device, dtype)
    for i in range(examples):
        draw_fit(axes[i + 1], learner, dist, tasks[i], (0, 1, steps), legend=i == 0)
        axes[i + 1].set_title(f"test task {i + 1}, {k}-shot")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_fits(
    learners: Sequence[tuple[MetaLearner, Sinusoid]],
    path: str | Path,
    shots: int = 5,
    steps: int = 10,
    examples: int = 3,
) -> Path:
    """The same test tasks fitted by each (learner, its task family): a row per learner, a column per task."""
    fig, axes = plt.subplots(len(learners), examples, figsize=(4.2 * examples, 3.2 * len(learners)), squeeze=False)
    for row, (learner, dist) in zip(axes, learners, strict=True):
        p = next(iter(learner.params.values()))
        tasks = fixed_tasks(dist, examples, shots, "dense").to(p.device, p.dtype)
        for i, ax in enumerate(row):
            draw_fit(ax, learner, dist, tasks[i], (0, 1, steps), legend=i == 0)
            ax.set_title(f"{learner.name}: test task {i + 1}, {shots}-shot", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
