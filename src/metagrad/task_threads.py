"""Tasks side by side on the CPU's cores: the eager task loop's meta-gradient, whole tasks on several threads.

On the CPU a convolutional network's tasks run one after another (``vectorize="auto"``). PyTorch's own
threads then split each operator of one task, and a task's operators are small (a few support images, 7x7 maps
in the strided Conv-4), so two threads ran the strided network's meta-iteration only 1.13-1.45x faster than one
(docs/results.md). Here each thread takes whole tasks instead, with one intra-op thread of its own, and
the tasks' results are combined in task order: the meta-gradient is the one-thread task loop's to the bit.
Memory holds one task's graph per thread instead of one.

What makes it safe:

* ``torch.func.functional_call`` swaps a module's parameters in place for the call, which two threads must not
  do to one module at once: each thread runs its tasks on a *shell* of the network (:func:`shell`), its own
  module objects around the same parameter and buffer tensors;
* what the caller's thread has set follows its tasks: context variables (the kind of pass), batch norm's mode
  (:func:`metagrad.models.norm.current_mode`) and autograd's grad mode;
* the learner runs tasks here only where nothing is shared between them (``MetaLearner._threads_for_tasks``):
  on the CPU, eagerly (``torch.compile`` is not thread-safe in PyTorch 2.13), outside ``vmap``, with no random
  layer in training, no autocast or PyTorch mode around the call, a network that :func:`why_not_threaded` accepts,
  per-task code of metagrad's own (or declared thread-safe), and only after the first task of a first call,
  alone on a task thread, wrote no buffer and drew no random number. ``torch.func``'s own state is per thread,
  so a task's transforms (iMAML's) run on its thread. Elsewhere the tasks run one after another as before.

Python's global interpreter lock is held only between operators: a task of Conv-4 spends most of its time in
oneDNN's and ATen's kernels, which release it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from metagrad.models import norm

__all__ = ["run_tasks", "shell", "current_module", "in_task_thread", "usable_cores", "why_not_threaded", "why_not_here"]

T = TypeVar("T")

# The shells a task thread's passes call, by the id of the learner's network: set while the thread runs tasks.
_LOCAL = threading.local()
_LOCK = threading.Lock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None  # one pool, grown to the most threads asked for
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))  # what nn.Module itself keeps in a module's __dict__


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the platform has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def shell(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree around the same tensors: every module is a new object with its own
    parameter, buffer and submodule tables (so that ``functional_call`` may swap them), holding the very
    ``Parameter`` and buffer tensors of ``model`` and sharing every other attribute. Built without the modules'
    ``__getstate__``/``__setstate__``: a shell is not a pickle."""
    made: dict[int, nn.Module] = {}

    def twin(module: nn.Module) -> nn.Module:
        if id(module) in made:  # a module reached twice (shared) stays one module
            return made[id(module)]
        out = object.__new__(type(module))
        made[id(module)] = out
        out.__dict__.update(module.__dict__)
        for cls in type(module).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if slot not in ("__dict__", "__weakref__") and hasattr(module, slot):
                    object.__setattr__(out, slot, getattr(module, slot))
        out.__dict__["_parameters"] = dict(module._parameters)
        out.__dict__["_buffers"] = dict(module._buffers)
        out.__dict__["_modules"] = {k: None if m is None else twin(m) for k, m in module._modules.items()}
        return out

    return twin(model)


def current_module(model: nn.Module) -> nn.Module:
    """The module that this thread's passes of ``model`` call: its shell on a task thread, else itself."""
    shells = getattr(_LOCAL, "shells", None)
    return model if not shells else shells.get(id(model), model)


def in_task_thread() -> bool:
    """Whether this thread is running tasks of :func:`run_tasks` (whose own calls then run one after another)."""
    return bool(getattr(_LOCAL, "shells", None))


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")  # fmt: skip
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def why_not_threaded(model: nn.Module) -> str | None:
    """Why tasks of ``model`` may not run on several threads, or None where they may.

    Refused: a global module hook, a hook on a module (forward or backward) unless the hook declares
    ``thread_safe_tasks = True``, or a parametrization, which may reach the original modules rather than a
    thread's shell; and a module that holds one of the network's modules or
    tensors other than as a registered submodule, parameter or buffer (in a list, a dict, a bound method, a
    ``functools.partial``): one task at a time, ``functional_call`` swaps the original's tensors and such a
    reference sees the task's weights, where on a shell it would not."""
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import parametrize

    if any(getattr(torch_module, name, None) for name in _GLOBAL_HOOKS):
        return "a global module hook is registered"
    tree = {id(m) for m in model.modules()}
    tree |= {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    for name, m in model.named_modules():
        where = name or "the network"
        if any(not _safe_hooks(getattr(m, h, None)) for h in _HOOKS):
            return f"{where} has a hook"
        if parametrize.is_parametrized(m):
            return f"{where} is parametrized"
        for key, value in vars(m).items():
            if key not in _MODULE_ATTRIBUTES and _reaches(value, tree, depth=3):
                return f"{where}.{key} holds a part of the network outside its registered modules and tensors"
    return None


def _safe_hooks(hooks: Any) -> bool:
    """Whether every hook in ``hooks`` (a module's table of them) declares ``thread_safe_tasks = True``: it reads
    the module it is called on, or the one being called on its thread, and nothing shared between tasks (CAVIA's
    context feed)."""
    return not hooks or all(getattr(hook, "thread_safe_tasks", False) is True for hook in hooks.values())


def _reaches(value: Any, tree: set[int], depth: int) -> bool:
    if id(value) in tree:
        return True
    if depth == 0:
        return False
    if isinstance(value, list | tuple | set | frozenset):
        return any(_reaches(v, tree, depth - 1) for v in value)
    if isinstance(value, dict):
        return any(_reaches(v, tree, depth - 1) for v in value.values())
    if isinstance(value, functools.partial):
        return _reaches((value.func, value.args, value.keywords or {}), tree, depth - 1)
    owner = getattr(value, "__self__", None)  # a bound method
    return owner is not None and id(owner) in tree


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there (a task sent to them would wait forever)."""
    global _LOCK, _POOL
    _POOL, _LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The one pool, with room for ``workers`` threads and for every core, so that it rarely grows. Its threads
    start as calls need them and then stay: the same few threads run every call's tasks. Each thread allocates
    from a glibc heap (arena) of its own, which keeps what is freed; a thread that ends hands its heap on to the
    next one started. The probe's one-thread pool used to be replaced by a two-thread one while its thread was
    still ending: a new thread then took a third heap, and the process's peak grew by about one task's
    activations (Conv-4, five steps, two threads: 832-864 MiB in five runs of seven, 755-783 in six of six
    since; docs/results.md). Calls are assumed not to overlap (one learner steps at a time in a process): two
    threads that each train a learner and ask for different thread counts may see one call's pool replaced under
    the other."""
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            size = max(workers, usable_cores())
            old, _POOL = _POOL, concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="metagrad-task")
            if old is not None:  # its threads end first, heaps handed on (none is busy: a learner's calls do not
                # overlap; a task's own call, nested in one of them, cannot wait for its own thread)
                old.shutdown(wait=not in_task_thread())
        return _POOL


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

    ``threads`` threads (at most one per item) each take the next item in order, with one intra-op thread, on
    its own :func:`shell` of ``model``, in a copy of the caller's context variables, with the caller's batch-norm
    mode and grad mode. (One intra-op thread each, also where threads outnumber the items: a task thread with
    more starts a team of OpenMP threads of its own, and from then on GNU OpenMP, counting more threads than
    cores, lets the caller's own team sleep between parallel regions instead of spinning: the caller's small
    operators then ran several times slower for the rest of the process.) The caller's thread waits with one
    intra-op thread (its OpenMP threads would otherwise spin on the tasks' cores). Once an item fails (or the
    caller is interrupted), no later item starts or is combined, the running ones finish, and the first failure
    in the items' order is raised: nothing runs on the learner once this returns."""
    n = len(items)
    workers = max(1, min(threads, n))
    mode, grad_enabled = norm.current_mode(), torch.is_grad_enabled()
    turn = threading.Condition()
    # The next item to hand out, the next to combine, and the first that failed (none after it runs or combines).
    state = {"take": 0, "combine": 0, "failed": n}
    results: list[Any] = [None] * n
    errors: dict[int, BaseException] = {}

    def failed(index: int, error: BaseException | None = None) -> None:
        with turn:
            state["failed"] = min(state["failed"], index)
            if error is not None:
                errors[index] = error
            turn.notify_all()

    def combine_in_order(index: int, result: T) -> None:
        with turn:
            turn.wait_for(lambda: state["combine"] == index or state["failed"] < index)
            if state["failed"] < index:
                return
        combine(result)  # type: ignore[misc]  # (alone: the later items wait for this one's turn to end)
        with turn:
            state["combine"] += 1
            turn.notify_all()

    def worker() -> None:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with _on_shell(model), norm.statistics(*mode), torch.set_grad_enabled(grad_enabled):
            while True:
                with turn:
                    index = state["take"]
                    if index >= n or state["failed"] < index:
                        return
                    state["take"] += 1
                try:
                    result = fn(items[index])
                    if combine is None:
                        results[index] = result
                    else:
                        combine_in_order(index, result)
                    del result
                except BaseException as error:  # noqa: BLE001 - handed to the caller below, in order
                    failed(index, error)
                    return

    threads_here = torch.get_num_threads()
    futures: list[concurrent.futures.Future[None]] = []
    try:
        torch.set_num_threads(1)
        pool = _pool(workers)
        futures = [pool.submit(contextvars.copy_context().run, worker) for _ in range(workers)]
        concurrent.futures.wait(futures)
    finally:
        if not all(f.done() for f in futures):  # interrupted: no further item starts or is combined
            failed(-1)
            concurrent.futures.wait(futures)
        torch.set_num_threads(threads_here)  # (also the count that threads started later begin with)
    for future in futures:  # a failure outside the tasks themselves
        future.result()
    if errors:
        raise errors[min(errors)]
    return [] if combine is not None else results


def why_not_here() -> str | None:
    """Why the calling thread's tasks may not go to other threads, or None: PyTorch state of this thread that
    its tasks would lose there (autocast, a torch function or dispatch mode, saved-tensor hooks, the profiler,
    inference mode)."""
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return "autocast is on"
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0:
        return "a PyTorch mode is active"
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return "saved-tensor hooks are active"
    if torch.autograd.profiler._is_profiler_enabled:
        return "the profiler is on"
    if torch.is_inference_mode_enabled():
        return "inference mode is on"
    return None
