"""Objects from a :class:`~metagrad.config.Config`: the task family, the network and the meta-learner.

Nothing here knows a component by name: each section names a registered component (see
:mod:`metagrad.registry`), which builds itself from its own options. The task family tells the model its input
and output shapes, and the algorithm its loss and metric.
"""

from __future__ import annotations

from typing import Any

import torch

from metagrad.algorithms import MetaLearner
from metagrad.config import Config
from metagrad.errors import ConfigError
from metagrad.registry import TaskSpec
from metagrad.tasks import TaskDistribution

__all__ = ["build_task", "build_model", "build_learner", "task_spec", "resolve_device", "DTYPES", "SPLITS"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPLITS = ("train", "val", "test")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available on this machine (no CUDA GPU); use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a valid device; use auto, cpu or cuda") from None


def build_task(cfg: Config, split: str = "test") -> TaskDistribution:
    """The task family of ``cfg`` for one split (train/val/test; by default the held-out test tasks, which is what
    every evaluation must use). An algorithm may transform it (the oracle adds each task's true parameters)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    section = cfg.task
    try:
        task = section.component.build(section.options, split)
    except ValueError as e:  # a component's own complaint about its options (MetagradErrors pass as they are)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task {section.name!r}: {e}") from None
    wrap = getattr(cfg.algorithm.component.target, "wrap_task", None)
    if wrap is not None:
        task = wrap(task)
    missing = [a for a in ("sample", "loss", "input_shape", "outputs") if not hasattr(task, a)]
    if missing:
        raise ConfigError(
            f"task {section.name!r} built a {type(task).__name__} without {', '.join(missing)}: a task family must "
            "have sample(batch_size, shots, queries, generator), loss, input_shape and outputs (metagrad.registry)"
        )
    return task


def task_spec(cfg: Config, task: Any | None = None) -> TaskSpec:
    """What the model and the algorithm need to know: shapes, loss and metric, inner steps, batching path."""
    target = cfg.task.component.target
    if task is None and hasattr(target, "spec") and not hasattr(cfg.algorithm.component.target, "wrap_task"):
        input_shape, outputs = target.spec(cfg.task.options)
        loss, metric = getattr(target, "loss", "mse"), getattr(target, "metric", None)
    else:
        task = task if task is not None else build_task(cfg, "train")
        input_shape, outputs = tuple(task.input_shape), int(task.outputs)
        loss, metric = task.loss, getattr(task, "metric", None)
    if not hasattr(target, "spec") and task is None:  # pragma: no cover - handled above
        raise ConfigError(f"task {cfg.task.name!r} declares no shapes")
    return TaskSpec(
        input_shape=tuple(int(d) for d in input_shape),
        outputs=int(outputs),
        loss=loss,
        metric=metric,
        inner_steps=int(getattr(cfg.algorithm, "inner_steps", 0)) if "inner_steps" in cfg.algorithm.keys else 0,
        vectorize=cfg.train.vectorize,
    )


def build_model(cfg: Config, spec: TaskSpec | None = None) -> torch.nn.Module:
    """The network of ``cfg``, built for the task's shapes. Its initialisation is drawn from a generator seeded
    by the run's seed, not the global RNG's state."""
    spec = spec if spec is not None else task_spec(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        try:
            model = cfg.model.component.build(cfg.model.options, spec)
        except ValueError as e:  # a component's own complaint about its options (MetagradErrors pass as they are)
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"model {cfg.model.name!r}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model {cfg.model.name!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_learner(cfg: Config, model: torch.nn.Module | None = None) -> MetaLearner:
    """The meta-learner a config describes (on the CPU, in float32 unless moved)."""
    spec = task_spec(cfg)
    model = model if model is not None else build_model(cfg, spec)
    options = cfg.algorithm.options
    # What an algorithm draws when built (CAVIA's context weights) comes from the run's seed too, from a stream
    # of its own (the model's initialisation drew from the seed itself).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((cfg.train.seed * 0x9E3779B97F4A7C15 + 1) % 2**63)
        learner = cfg.algorithm.component.build(type(options)(**vars(options)), model, spec)
    if not isinstance(learner, MetaLearner):
        raise ConfigError(
            f"algorithm {cfg.algorithm.name!r} built a {type(learner).__name__}, not a metagrad.MetaLearner"
        )
    learner.tf32, learner.precise_norms = cfg.train.tf32, cfg.train.precise_norms
    learner.task_threads = cfg.train.task_threads
    return learner
