"""The task batch every algorithm consumes and the protocol a task family implements."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["TaskBatch", "TaskDistribution", "shard_bounds", "shard_weight"]


@dataclass
class TaskBatch:
    """A batch of B tasks as stacked tensors.

    ``support_x`` is [B, K, ...], ``support_y`` [B, K, ...], ``query_x`` [B, Q, ...], ``query_y`` [B, Q, ...].
    ``info`` holds each task's true parameters ([B, ...] tensors, e.g. amplitude and phase), for baselines
    such as the oracle and for plots; algorithms must not read it.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from metagrad.errors import DataError

        fields_ = {f: getattr(self, f) for f in ("support_x", "support_y", "query_x", "query_y")}
        for f, t in fields_.items():
            if not isinstance(t, Tensor):
                raise DataError(f"TaskBatch.{f} must be a tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise DataError(f"TaskBatch.{f} must be [B, points, ...], got shape {tuple(t.shape)}")
        sizes = {f: t.shape[0] for f, t in fields_.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"TaskBatch fields disagree on the number of tasks B: {sizes}")
        for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
            if fields_[x].shape[1] != fields_[y].shape[1]:
                raise DataError(
                    f"TaskBatch.{x} has {fields_[x].shape[1]} points per task but {y} has {fields_[y].shape[1]}"
                )
        if sizes["support_x"] and (fields_["support_x"].shape[1] < 1 or fields_["query_x"].shape[1] < 1):
            raise DataError(
                f"every task needs at least one support and one query point (K >= 1, Q >= 1); got "
                f"K = {fields_['support_x'].shape[1]}, Q = {fields_['query_x'].shape[1]}"
            )

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """The batch on ``device``, its floating-point tensors in ``dtype`` (``self`` when nothing moves)."""
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:  # "cuda" means the current device, as in Tensor.to
            target = torch.device("cuda", torch.cuda.current_device())
        tensors = [self.support_x, self.support_y, self.query_x, self.query_y, *self.info.values()]
        if all(
            (t.device == target or (t.device.type == target.type == "cpu"))
            and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
            for t in tensors
        ):
            return self

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return TaskBatch(
            *(move(getattr(self, f.name)) for f in fields(self) if f.name != "info"),
            info={k: move(v) for k, v in self.info.items()},
        )

    def __getitem__(self, index: int | slice) -> TaskBatch:
        """Select tasks (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"task index {index} out of range for {n} tasks")
            index %= n
            index = slice(index, index + 1)
        return TaskBatch(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            {k: v[index] for k, v in self.info.items()},
        )

    def split(self, parts: int, rank: int) -> TaskBatch:
        """The ``rank``-th of ``parts`` contiguous shards along the task dimension (see :func:`shard_bounds`)."""
        start, stop = shard_bounds(len(self), parts, rank)
        return self[start:stop]


def shard_bounds(tasks: int, parts: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the ``rank``-th of ``parts`` contiguous shards of ``tasks`` tasks: the sizes differ by
    at most one (the first ``tasks % parts`` shards take one more), and every shard has at least one task."""
    if parts <= 0 or not 0 <= rank < parts:
        raise ValueError(f"need parts > 0 and 0 <= rank < parts, got parts={parts}, rank={rank}")
    if tasks < parts:
        raise ValueError(f"cannot split {tasks} tasks into {parts} shards: each needs at least one")
    size, extra = divmod(tasks, parts)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def shard_weight(tasks: int, parts: int, rank: int) -> float:
    """What a shard's mean must be multiplied by so that the plain mean over the ``parts`` shards is the mean over
    all ``tasks`` tasks: ``shard size · parts / tasks`` (exactly 1 for equal shards)."""
    start, stop = shard_bounds(tasks, parts, rank)
    return (stop - start) * parts / tasks


@runtime_checkable
class TaskDistribution(Protocol):
    """A family of tasks. Implement ``sample`` to plug your own family into metagrad.

    ``sample`` must draw every random number from ``generator`` (never the global RNG), so that the same
    seed gives the same tasks.

    Optional members, which metagrad uses when a family has them (the sinusoid family has both):

    * ``evaluation_tasks(n, shots, queries, scoring, generator) -> TaskBatch``: the fixed test tasks of
      ``metagrad eval`` for a scoring (``eval.scoring``, e.g. a dense grid of query points). Without it, the
      evaluator draws ``sample(n, shots, queries, generator)`` and reports the scoring as ``"query"``.
    * ``curve(x, info) -> Tensor`` and ``x_range``: a 1-D regression family's noise-free targets at points
      ``x`` [B, N, 1] of the tasks ``info`` describes; ``eval --plot`` and ``compare`` then draw example fits.
    * ``draw(batch_size, shots, queries, generator) -> tuple[Tensor, ...]`` and ``assemble(draws, batch_size,
      shots, queries) -> TaskBatch``: ``sample`` split into the generator's calls and tensor arithmetic on their
      numbers, with ``sample(...) == assemble(draw(...), ...)`` bit for bit. A compiled trainer then runs
      ``assemble`` inside its compiled update (``metagrad.fused_update``), where Inductor's kernels may round a
      float64 result differently in the last bit. Regression families only (labels are range-checked on every
      batch, eagerly); a family whose ``sample`` is not the one that goes with its ``assemble`` (overridden in a
      subclass or on the instance) is sampled eagerly.
    """

    name: str

    def sample(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``batch_size`` tasks with ``shots`` support and ``queries`` query points each."""
        ...
