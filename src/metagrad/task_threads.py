"""Tasks side by side on the CPU's cores: the eager task loop's meta-gradient, whole tasks on several threads.

On the CPU a convolutional network's tasks run one after another (``vectorize="auto"``). PyTorch's own
threads then split each operator of one task, and a task's operators are small (a few support images, 7x7 maps
in the strided Conv-4): two threads ran the strided network's five-step meta-iteration only 1.05x faster than
one. Here each thread takes a whole task instead, with one intra-op thread of its own (more where the threads
outnumber the tasks), and the tasks' gradients are summed in task order: the result is the one-thread task
loop's to the bit, whatever the number of threads. Memory holds one task's graph per thread instead of one.

What makes it safe:

* ``torch.func.functional_call`` swaps a module's parameters in place for the call, which two threads must not
  do to one module at once: each task runs on a *shell* of the network (:func:`shell`), its own module objects
  around the same parameter and buffer tensors, made afresh for every task;
* metagrad's per-call settings follow each task onto its thread: the caller's context variables (the kind of
  pass) and batch norm's mode (:func:`metagrad.models.norm.current_mode`), and autograd's grad mode;
* the learner runs tasks here only where nothing is shared between them: no ``torch.func`` transform and no
  ``torch.compile`` (neither is thread-safe in PyTorch 2.13), no random layer in training (their draws come
  from one generator in task order), no hook or parametrization on the network (a hook may reach the original
  module rather than the shell), on the CPU. Elsewhere the tasks run one after another as before.

Python's global interpreter lock is held only between operators: a task of Conv-4 spends most of its time in
oneDNN's and ATen's kernels, which release it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import copy
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from metagrad.models import norm

__all__ = ["run_tasks", "shell", "current_module", "in_task_thread", "shareable"]

T = TypeVar("T")

# The module a thread's passes call, by the learner's network: set for the duration of one task.
_LOCAL = threading.local()
_LOCK = threading.Lock()
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}  # by size: a pool runs that many tasks at once


def shell(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree around the same tensors: every module is a new object with its own
    parameter, buffer and submodule tables (so that ``functional_call`` may swap them), holding the very
    ``Parameter`` and buffer tensors of ``model`` and sharing every other attribute."""
    made: dict[int, nn.Module] = {}

    def twin(module: nn.Module) -> nn.Module:
        if id(module) in made:  # a module reached twice (shared) stays one module
            return made[id(module)]
        out = copy.copy(module)
        made[id(module)] = out
        out.__dict__["_parameters"] = dict(module._parameters)
        out.__dict__["_buffers"] = dict(module._buffers)
        out.__dict__["_modules"] = {k: None if m is None else twin(m) for k, m in module._modules.items()}
        return out

    return twin(model)


def current_module(model: nn.Module) -> nn.Module:
    """The module that this thread's passes of ``model`` call: its shell inside :func:`run_tasks`, else itself."""
    shells = getattr(_LOCAL, "shells", None)
    return model if not shells else shells.get(id(model), model)


def in_task_thread() -> bool:
    """Whether this thread is running a task of :func:`run_tasks` (whose own calls then run one after another)."""
    return bool(getattr(_LOCAL, "shells", None))


def shareable(model: nn.Module) -> bool:
    """Whether tasks of ``model`` may run on several threads: no forward hook or pre-hook on any module (nor a
    global one), and no parametrization (both may reach the original module rather than the thread's shell)."""
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import parametrize

    if any(getattr(torch_module, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m):
            return False
    return True


def _forget_pools() -> None:
    """In a forked child: the parent's pool threads do not exist there (a task sent to them would wait forever)."""
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="metagrad-task")
        return _POOLS[workers]


@contextlib.contextmanager
def _on_shell(model: nn.Module) -> Iterator[None]:
    saved = getattr(_LOCAL, "shells", None)
    _LOCAL.shells = {**(saved or {}), id(model): shell(model)}
    try:
        yield
    finally:
        _LOCAL.shells = saved


def run_tasks(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    threads: int,
    model: nn.Module,
    combine: Callable[[T], None] | None = None,
) -> list[T]:
    """``fn(item)`` for every item, on up to ``threads`` threads at once; the results in the items' order, or,
    with ``combine``, each result handed to ``combine`` in the items' order (on the thread that computed it, once
    the earlier items' are combined) and not kept: ``[]`` is returned.

    Combining on the task's thread as soon as its turn comes frees each result before that thread's next task
    allocates its activations. Results held until the end instead sat between the next tasks' large blocks in
    the allocator's heap, which then grew by about one task's activations every two tasks (Conv-4, 32 tasks on
    two threads: 1.1 GiB against 0.6).

    Each call runs with ``threads // workers`` intra-op threads (at least one), on its own :func:`shell` of
    ``model``, in a copy of the caller's context variables, with the caller's batch-norm mode and grad mode.
    The caller's thread waits with one intra-op thread (its OpenMP threads would otherwise spin on the tasks'
    cores). If a call fails (or the caller is interrupted), the calls not yet started are cancelled, the running
    ones finish, and the first item's error in order is raised: nothing runs on the learner once this returns."""
    workers = max(1, min(threads, len(items)))
    each = max(1, threads // workers)
    mode, grad_enabled = norm.current_mode(), torch.is_grad_enabled()
    turn = threading.Condition()
    # The next item to combine, and the first item that failed (the later ones are not combined).
    state = {"next": 0, "failed": len(items)}

    def failed(index: int) -> None:
        with turn:
            state["failed"] = min(state["failed"], index)
            turn.notify_all()

    def combine_in_order(index: int, result: T) -> None:
        with turn:
            turn.wait_for(lambda: state["next"] == index or state["failed"] < index)
            if state["failed"] < index:
                return
        try:
            combine(result)  # type: ignore[misc]  # (alone: the later items wait for this one's turn to end)
        except BaseException:
            failed(index)
            raise
        with turn:
            state["next"] += 1
            turn.notify_all()

    def job(index: int, item: Any, context: contextvars.Context) -> T | None:
        def run() -> T | None:
            if torch.get_num_threads() != each:
                torch.set_num_threads(each)
            try:
                with _on_shell(model), norm.restore_mode(mode), torch.set_grad_enabled(grad_enabled):
                    result = fn(item)
            except BaseException:
                failed(index)
                raise
            if combine is None:
                return result
            combine_in_order(index, result)
            return None

        return context.run(run)

    pool, threads_here = _pool(workers), torch.get_num_threads()
    torch.set_num_threads(1)
    futures = [pool.submit(job, i, item, contextvars.copy_context()) for i, item in enumerate(items)]
    try:
        concurrent.futures.wait(futures)
    finally:
        if not all(f.done() for f in futures):  # interrupted: the tasks not yet combined stop at their turn
            failed(-1)
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        torch.set_num_threads(threads_here)  # (also the count that threads started later begin with)
    for future in futures:  # the first failure in the items' order, as the one-thread loop would meet it
        error = future.exception()
        if error is not None:
            raise error
    return [] if combine is not None else [f.result() for f in futures]
