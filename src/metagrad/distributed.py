"""Data-parallel meta-training with ``torch.distributed``, launched by ``torchrun``.

Every rank draws the same full meta-batch from the same seeded stream and keeps its own contiguous shard of
the tasks, so the ranks' tasks are distinct and the run is reproducible. Meta-gradients (and Reptile's weight
deltas and inner-optimizer state) are averaged with one all-reduce per iteration, which makes N ranks with a
meta-batch of B compute the same update as one process with B (to float rounding). Rank 0 alone logs, shows
progress, validates and writes checkpoints. Backend: NCCL on CUDA, gloo on the CPU.

Teardown: :func:`shutdown_world` (and, for a rank that fails before it gets there, an exit hook) destroys the
process group while the interpreter is fully alive. That must really free the group: gloo's worker threads are
joined only by its destructor, and a worker still alive when the interpreter finalizes aborts the process
("terminate called without an active exception", SIGABRT) if it then drops the last reference to a collective's
tensor, which needs the GIL. See the import of ``torch.distributed.nn`` below for what kept the group alive.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from metagrad.errors import MetagradError

if dist.is_available():
    # Imported here, before any process group exists, on purpose: torch.distributed.nn.functional binds the default
    # group that exists when it is first imported into its functions' default arguments (``group=group.WORLD``),
    # and torch.optim and torch.func import it lazily (through torch._dynamo), i.e. after init_process_group. Those
    # references kept the group alive after destroy_process_group, so gloo's worker threads outlived the
    # interpreter and could abort any rank at exit. Imported first, the defaults hold None.
    import torch.distributed.nn  # noqa: F401

__all__ = ["World", "init_world", "shutdown_world", "all_reduce_mean", "average_meta_step", "on_main"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment (no-op in a plain process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":  # (bound to this rank's GPU: NCCL's barrier then needs no guess of the device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        # A rank that fails between here and shutdown_world (e.g. on a config error) still leaves the group before
        # the interpreter starts finalizing; a no-op after shutdown_world.
        atexit.register(_destroy_process_group)
        # Every rank has joined before any may leave: gloo's init returns on one rank while another is still
        # connecting, and a rank that then stopped on bad input (rank 0's one-line error) made the other's
        # connection fail with a traceback.
        dist.barrier()
    return World(rank, size, local_rank), device


def all_reduce_mean(tensors: list[Tensor], world: World) -> list[Tensor]:
    """The mean over ranks of each tensor, with one collective on a flat buffer."""
    if not world.enabled or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def average_meta_step(learner: torch.nn.Module, metrics: dict[str, Tensor], world: World) -> dict[str, Tensor]:
    """Average one meta-step over the ranks, in one collective: the ``.grad`` of the learner's parameters (in
    place), its ``extra_state`` (e.g. Reptile's inner-optimizer moments, in place) and the step's ``metrics``
    (returned). A no-op in a single process."""
    if not world.enabled:
        return metrics
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    names = list(metrics)
    extra = learner.extra_state
    reduced = all_reduce_mean(grads + [metrics[k] for k in names] + list(extra.values()), world)
    for g, r in zip(grads, reduced, strict=False):
        g.copy_(r)
    for k, v in zip(list(extra), reduced[len(grads) + len(names) :], strict=True):
        extra[k] = v
    return dict(zip(names, reduced[len(grads) : len(grads) + len(names)], strict=True))


def on_main(world: World, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 alone (e.g. creating the run directory) and make every rank agree on its outcome.

    If it raises a :class:`MetagradError` (bad input), every rank raises the same error, so all exit together with
    one message (printed by rank 0) instead of the others waiting at the next collective until torchrun kills
    them. Also a barrier: no rank goes on before rank 0 is done."""
    error: MetagradError | None = None
    if world.is_main:
        try:
            fn()
        except MetagradError as e:
            error = e
    if world.enabled:
        box: list[MetagradError | None] = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def shutdown_world(world: World) -> None:
    """Leave the process group (end of training): destroy it, which joins gloo's worker threads."""
    if world.enabled:
        _destroy_process_group()


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
