"""One function for a whole training update: the meta-gradient, its norm, the divergence guard, gradient clipping
and the optimizer's step (Adam or SGD), which :class:`~metagrad.Trainer` runs compiled on the CPU when the learner
is compiled (``train.compile``, ``train.fused_update``), and on a GPU replayed from a CUDA graph, compiled or not
(``train.cuda_graphs``, :mod:`metagrad.cuda_graph`).

Run one after another, the compiled meta-step and the small eager parts around it (the norm and the metrics'
host copy, the fused Adam kernel) each met caches the other had just evicted: on the sinusoid MAML step they
took 1.6-4.1x their time alone (``benchmarks/iteration_parts.py``). Inside the meta-step's graph the update is a
few fused loops over tensors that are still in cache, and the step is one call instead of four. A task family
that splits its sampling into ``draw`` (the generator's calls) and ``assemble`` (arithmetic only), as the
sinusoid family does, has its tasks assembled in the same call (:class:`Draws`): only the generator's calls stay
eager, and the tasks are those ``sample`` gives (to the last bit of Inductor's float64 ``sin``).

The update is the optimizer's own, on its own state: ``optimizer.state`` holds the same tensors (Adam's
``step``, ``exp_avg``, ``exp_avg_sq``, laid out as ``torch.optim.Adam(fused=True)`` lays them out), so
``state_dict()``, checkpoints and resume work unchanged, and a run may switch between the fused and the separate
update at any checkpoint. The arithmetic is Adam's (Kingma & Ba 2015, as ``torch.optim.Adam`` computes it), in
another order: the two agree to rounding (tested in float64), not bit for bit. A non-finite meta-loss or
meta-gradient leaves the weights and the optimizer's state as they were, as the separate update does, and the
trainer then stops with its DivergenceError.

What it covers (:func:`unfused_reason` says why not, otherwise): ``torch.optim.Adam`` without weight decay,
AMSGrad or ``maximize``, and ``torch.optim.SGD`` without momentum or weight decay (the optimizers that
``train.optimizer`` builds), without step hooks; one process; a learner compiled on the CPU without Inductor's
CUDA graphs, whose tasks go in one chunk, without batch-norm running statistics (``learner.backward`` updates
them between the meta-gradient and the step), or on a GPU in metagrad's CUDA graphs, compiled likewise or
uncompiled (then chunks and running statistics too, but no random layers); and whose meta-step is
:class:`~metagrad.algorithms.MetaLearner`'s own (MAML, first-order MAML, Meta-SGD, MAML Enhanced, ANIL, CAVIA)
or has its fused form
(:meth:`~metagrad.algorithms.MetaLearner._fused_gradient` and ``_step_draws``: Reptile). Anything else takes the
separate update, with the same results. As there, the norm that the guard and the clipping use is that of every
gradient the learner computes, also where the optimizer holds only some of the tensors; a tensor the optimizer
holds that gets no meta-gradient (``learner.not_meta_learned``: CAVIA's context) is skipped, as ``torch.optim``
skips a parameter without ``.grad``: no step and no state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from metagrad.algorithms.base import MetaLearner, _detach, _with_own_code
from metagrad.cuda_graph import CapturedFunction, Graph
from metagrad.errors import CompileError, ConfigError
from metagrad.tasks.base import TaskBatch
from metagrad.transforms import transforms_only

__all__ = ["Draws", "FusedUpdate", "assembles", "unfused_reason"]

_ADAM_DEFAULTS = {"weight_decay": 0, "amsgrad": False, "maximize": False, "differentiable": False, "capturable": False}
_SGD_DEFAULTS = {"momentum": 0, "weight_decay": 0, "nesterov": False, "maximize": False, "differentiable": False}


def _overrides(learner: MetaLearner, name: str) -> bool:
    return getattr(type(learner), name) is not getattr(MetaLearner, name)


def _owner(learner: MetaLearner, name: str) -> type:
    """The class in ``learner``'s hierarchy that defines the method ``name``."""
    return next(k for k in type(learner).__mro__ if name in vars(k))


def unfused_reason(
    learner: MetaLearner, optimizer: torch.optim.Optimizer, tasks: int, world_size: int, graphed: bool = False
) -> str | None:
    """Why a training step of ``learner`` with ``optimizer`` on ``tasks`` tasks cannot run as one compiled
    function (``graphed``: as one CUDA graph on the learner's GPU, compiled or not), or None when it can."""
    reason = _setting_reason(learner, optimizer, tasks, world_size, graphed=graphed)
    if reason is not None:
        return reason
    name = type(learner).__name__
    own_step = any(_overrides(learner, m) for m in ("_meta_step", "_compile_target"))
    # The fused form must be at least as specific as the meta-step: a subclass of Reptile with a _meta_step of
    # its own inherits a _fused_gradient that knows nothing of it.
    fused_form = _owner(learner, "_fused_gradient")
    stale = any(not issubclass(fused_form, _owner(learner, m)) for m in ("_meta_step", "_compile_target"))
    if any(_overrides(learner, m) for m in ("backward", "meta_gradient")) or (own_step and stale):
        return f"{name} has its own meta-step"
    mine = {id(p) for p in learner._named_parameters().values()} | {id(p) for p in learner._learned_tensors().values()}
    if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
        return "the optimizer holds tensors that are not the learner's"
    rule = {id(p) for p in learner._learned_tensors().values()}
    if own_step and any(id(p) in rule for g in optimizer.param_groups for p in g["params"]):
        return f"the optimizer holds the inner rule's tensors, which {name}'s meta-step does not differentiate"
    return None


def _setting_reason(
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer,
    tasks: int,
    world_size: int,
    ids: tuple[tuple[int, ...], ...] | None = None,
    graphed: bool = False,
) -> str | None:
    """The part of :func:`unfused_reason` that settings may change between two steps (checked at every step).
    ``ids``: the optimizer's parameters (by ``id``, per group) that a fused update was built for, if any."""
    if learner._compiled is None and not graphed:
        return "the learner is not compiled"
    if learner._cuda_graphs:
        return "the learner's compiled step captures CUDA graphs"
    if graphed and learner.random and (learner.training or learner.model.training):
        return "the network draws random numbers (dropout), which a CUDA graph would replay unchanged"
    if world_size > 1:
        return "the meta-gradient is all-reduced between the processes before the update"
    if learner.task_chunk(tasks) != tasks and not (graphed and learner._compiled is None and _own_fused_form(learner)):
        # (A compiled update would unroll every chunk into one graph; a meta-step of its own may not chunk.)
        return "the tasks are differentiated in chunks"
    if learner.training and learner.tracks_statistics and not (graphed and learner._compiled is None):
        # learner.backward folds the batch into them between the meta-gradient and the optimizer's step: the eager
        # update in a CUDA graph does so too (track_statistics, in place); a compiled one does not trace it.
        return "batch norms track running statistics"
    if type(optimizer) is torch.optim.Adam:
        defaults = _ADAM_DEFAULTS
    elif type(optimizer) is torch.optim.SGD:
        defaults = _SGD_DEFAULTS
    else:
        return f"{type(optimizer).__name__} is not fused (Adam and SGD are)"
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks or _global_step_hooks():
        return "the optimizer has step hooks"
    groups = optimizer.param_groups
    if ids is not None and len(ids) != len(groups):
        return "the optimizer's parameter groups changed"
    for index, group in enumerate(groups):
        for key, value in defaults.items():
            if group.get(key, value) != value:
                return f"the optimizer's {key}={group[key]!r}"
        params, lr = group["params"], group["lr"]
        if isinstance(lr, Tensor):
            return "the optimizer's learning rate is a tensor"
        if params and abs(lr) > _largest(params[0].dtype):
            return "the learning rate does not fit the weights' dtype"  # optimizer.step() says so
        if ids is not None and tuple(map(id, params)) != ids[index]:
            return "the optimizer's parameters changed"
        for p in params:
            if not p.requires_grad:
                return "the optimizer holds a frozen tensor (requires_grad=False)"
            if not graphed and not p.is_cpu:
                return "the learner is not on the CPU (the compiled fused update was measured on the CPU only)"
    return None


def _own_fused_form(learner: MetaLearner) -> bool:
    """Whether ``learner``'s fused meta-step is MetaLearner's own, which differentiates chunks one after another."""
    return _owner(learner, "_fused_gradient") is MetaLearner


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


class FusedUpdate:
    """``update(batch, iteration, generator)``: one meta-iteration of ``learner`` with ``optimizer``, as one call
    of a compiled function (see the module docstring). Returns ``(grad_norm, finite, metrics)``: the meta-gradient's
    global norm before clipping, whether the update was applied (the meta-loss and gradient were finite), and the
    metrics as floats. ``clip``: the global-norm bound (``train.grad_clip``), or None.

    ``graphs``: run the update from CUDA graphs (:class:`~metagrad.cuda_graph.CapturedFunction` on the learner's
    device), compiled if the learner is, else eagerly: a graph's replay launches the whole update at once. The
    tasks, any draws, the multi-step loss weights and the learning rates are the graph's inputs; the Python values
    the update reads (first order or not, the weights' presence, the optimizer's betas and eps, the batch's shapes,
    the learner's and its modules' public settings: :func:`_settings`) key a graph of its own. A network's own
    Python code is replayed as captured: one that branches on anything else between steps needs
    ``train.cuda_graphs = false``. ``graph``: what captures (tests: :class:`~metagrad.cuda_graph.ReplayedCalls`)."""

    def __init__(
        self,
        learner: MetaLearner,
        optimizer: torch.optim.Optimizer,
        clip: float | None,
        graphs: bool = False,
        graph: Callable[[], Graph] | None = None,
    ) -> None:
        self.learner, self.optimizer, self.clip = learner, optimizer, clip
        self.adam = type(optimizer) is torch.optim.Adam
        tensors = {id(p): ("p", k) for k, p in learner._named_parameters().items()}
        tensors |= {id(p): ("m", k) for k, p in learner._learned_tensors().items()}
        # Which tensor each of the optimizer's parameters is, by group: fixed for this optimizer. Those the
        # meta-gradient leaves out (learner.not_meta_learned) get no gradient, which torch.optim skips: so here.
        excluded = self._excluded = learner.not_meta_learned  # (fixed by the learner's options: read once)
        keys = tuple(tuple(tensors[id(p)] for p in g["params"]) for g in optimizer.param_groups)
        self._skipped = tuple(tuple(kind == "p" and k in excluded for kind, k in group) for group in keys)
        self.keys = tuple(tuple(k for k in group if not (k[0] == "p" and k[1] in excluded)) for group in keys)
        self._ids = _ids(optimizer)
        self._backward = type(learner).backward
        self._source = learner._compiled  # a learner compiled again (other options) gets a new update
        self._checked: set[tuple[int, int, int, int]] = set()  # (family, tasks, shots, queries) whose draws passed
        self._lrs: tuple[tuple[float, ...], Tensor | None] = ((), None)
        if learner._compiled is None:
            self._compiled = self._update
        else:
            self._compiled = torch.compile(_with_own_code(self._update), **learner._torch_compile_options)
        self.graphs: CapturedFunction | None = None
        if graphs:
            device = _device(learner._named_parameters())
            if graph is None and device.type != "cuda":
                raise ConfigError(f"graphs=True replays CUDA graphs, but the learner is on {device}: move it to a GPU "
                                  "(learner.to('cuda')) or leave graphs off")  # fmt: skip
            self.graphs = CapturedFunction(device, **({} if graph is None else {"graph": graph}))

    def applies(self, learner: MetaLearner, optimizer: torch.optim.Optimizer, clip: float | None, tasks: int,
                world_size: int) -> bool:  # fmt: skip
        """Whether this update was built for these and they still allow it (the trainer builds another when one
        is replaced, and runs the parts separately when a setting rules the fused update out)."""
        same = learner is self.learner and optimizer is self.optimizer and clip == self.clip
        if not (same and learner._compiled is self._source and type(learner).backward is self._backward):
            return False
        graphed = self.graphs is not None
        if graphed and _device(learner._named_parameters()) != self.graphs.device:
            return False
        return _setting_reason(learner, optimizer, tasks, world_size, self._ids, graphed) is None

    def _state(self) -> tuple[list[Tensor], ...]:
        """Adam's state tensors in group order (created as ``torch.optim.Adam(fused=True)`` creates them on its
        first step, the parameters whose state was created in ``self._created``), or nothing for SGD."""
        self._created: list[Tensor] = []
        if not self.adam:
            return [], [], []
        steps, avgs, squares = [], [], []
        for group, skipped in zip(self.optimizer.param_groups, self._skipped, strict=True):
            for p, skip in zip(group["params"], skipped, strict=True):
                if skip:  # no gradient: no state either, as torch.optim leaves it
                    continue
                state = self.optimizer.state[p]
                if not state:
                    # torch.optim.Adam's own layout: float32 on the device when fused (or capturable), else on the
                    # CPU in float64 if that is the default dtype.
                    on_device = group["fused"] or group["capturable"]
                    wide = torch.get_default_dtype() == torch.float64 and not group["fused"]
                    scalar = torch.float64 if wide else torch.float32
                    self._created.append(p)
                    state["step"] = torch.zeros((), dtype=scalar, device=p.device if on_device else "cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps.append(state["step"])
                avgs.append(state["exp_avg"])
                squares.append(state["exp_avg_sq"])
        return steps, avgs, squares

    def __call__(
        self, batch: TaskBatch | Draws, iteration: int, generator: torch.Generator | None
    ) -> tuple[float, bool, dict[str, float]]:
        learner = self.learner
        named = learner._named_parameters()
        if isinstance(batch, Draws):  # the tasks are assembled inside the compiled call
            tasks, sizes = batch.values, (batch.family, batch.batch_size, batch.shots, batch.queries)
            key = (id(batch.family), *sizes[1:])
            if key not in self._checked:  # the same shapes and dtypes every time: checked once, on the first
                learner._check_batch(batch.batch().to(_device(named), _dtype(named)), named)
                self._checked.add(key)
            device = _device(named)
        else:
            learner._check_batch(batch, named)
            tasks, sizes, device = _fields(batch), None, batch.support_x.device
        weights, first_order = learner.schedule(iteration)
        params = _detach(named)
        learned, frozen = learner._split_learned(params, named, self._excluded)
        rule_tensors = learner._learned_tensors()  # learner.meta_state's tensors, from the learner's cached index
        meta = _detach(rule_tensors)
        groups = self.optimizer.param_groups
        lrs = tuple(g["lr"] for g in groups)
        if lrs != self._lrs[0]:  # a new tensor only when a learning rate changed
            self._lrs = (lrs, torch.tensor(lrs, dtype=torch.float64))
        hyper = tuple((*g.get("betas", (0.0, 0.0)), g.get("eps", 0.0)) for g in groups)
        if isinstance(batch, Draws):
            n, points = batch.batch_size, batch.shots + batch.queries
        else:
            n, points = len(batch), batch.support_x.shape[1] + batch.query_x.shape[1]
        draws = learner._step_draws(n, points, generator)  # after the tasks' draws, as the separate path
        extra = _detach(learner.extra_state)
        norm_meta = tuple(k for k, p in rule_tensors.items() if p.requires_grad)
        args = (learned, frozen, meta, tasks, sizes, weights, first_order, 1.0 / n, draws, extra, *self._state(),
                self._lrs[1], hyper, norm_meta)  # fmt: skip

        def separately() -> Any:  # for a failure's explanation only: the plain meta-step, eagerly
            b = batch.batch().to(device, _dtype(named)) if isinstance(batch, Draws) else batch
            plain = (b.support_x, b.support_y, b.query_x, b.query_y)
            return learner._fused_gradient(learned, frozen, meta, plain, weights, first_order, 1.0 / n, draws, extra)

        try:
            with torch.no_grad(), learner._task_randomness(generator, device):
                if self.graphs is None:
                    out, names = self._compiled(*args)
                else:
                    with learner._numerics(next(iter(named.values()))):
                        out, names = self._replayed(args)
        except RuntimeError as e:  # (a try block costs nothing on the way through; a context manager would)
            explained = learner._transform_error(e, separately)
            if explained is None:
                raise
            raise explained from (e if isinstance(explained, CompileError) else None)  # (the backend's traceback)
        norm, finite, *values = out.tolist()  # one host copy of the norm, the flag and the metrics
        if finite:
            self.optimizer._opt_called = True  # what optimizer.step() sets; the LR scheduler checks it
        else:  # nothing was updated: no state either, as after the separate path's guard
            for p in self._created:
                del self.optimizer.state[p]
        return norm, bool(finite), dict(zip(names, values, strict=True))

    def _replayed(self, args: tuple[Any, ...]) -> tuple[Tensor, tuple[str, ...]]:
        """``self._compiled(*args)`` through the CUDA graphs (see the class docstring)."""
        (learned, frozen, meta, tasks, sizes, weights, first_order, scale, draws, extra, steps, avgs, squares, lrs,
         hyper, norm_meta) = args  # fmt: skip
        inputs = [*tasks, *draws, lrs, *(() if weights is None else (weights,))]
        # (The network's buffers too: functional_call reads them at their addresses.)
        buffers = self.learner.model.buffers()
        state = [*learned.values(), *frozen.values(), *meta.values(), *extra.values(), *steps, *avgs, *squares,
                 *buffers]  # fmt: skip
        # A family that assembles the tasks inside the graph: its settings (ranges, noise) are fixed there too.
        family = None if sizes is None else (type(sizes[0]), id(sizes[0]), *_plain(sizes[0]), *sizes[1:])
        settings = (*_settings(self.learner), torch.get_default_dtype())
        key = (family, weights is None, first_order, scale, hyper, norm_meta, len(tasks), len(draws), settings)
        n, d = len(tasks), len(draws)

        def body(x: list[Tensor]) -> tuple[Tensor, tuple[str, ...]]:
            w = None if weights is None else x[n + d + 1]
            with transforms_only():  # (torch.func's meta-step: the eager task loop's autograd needs grad mode)
                tasks_, draws_, lrs_ = tuple(x[:n]), tuple(x[n : n + d]), x[n + d]
                return self._compiled(learned, frozen, meta, tasks_, sizes, w, first_order, scale, draws_, extra,
                                      steps, avgs, squares, lrs_, hyper, norm_meta)  # fmt: skip

        return self.graphs(key, body, inputs, state)

    def _update(
        self,
        learned: dict[str, Tensor],
        frozen: dict[str, Tensor],
        meta: dict[str, Tensor],
        tasks: tuple[Tensor, ...],
        sizes: tuple[Any, int, int, int] | None,
        weights: Tensor | None,
        first_order: bool,
        scale: float,
        draws: tuple[Tensor, ...],
        extra: dict[str, Tensor],
        steps: list[Tensor],
        avgs: list[Tensor],
        squares: list[Tensor],
        lrs: Tensor,
        hyper: tuple[tuple[float, float, float], ...],
        norm_meta: tuple[str, ...],
    ) -> tuple[Tensor, tuple[str, ...]]:
        if sizes is not None:  # draws: the task family assembles the batch here, inside the graph
            family, *shape = sizes
            batch = family.assemble(tasks, *shape)
            dtype = next(iter(learned.values())).dtype
            tasks = tuple(t.to(dtype) if t.is_floating_point() else t for t in _fields(batch))
        learner = self.learner
        gp, gm, metrics, written = learner._fused_gradient(learned, frozen, meta, tasks, weights, first_order, scale,
                                                           draws, extra)  # fmt: skip
        if learner.training and learner.tracks_statistics:  # as learner.backward: before the weights move
            learner.track_statistics(TaskBatch(*tasks))
        for k, v in written.items():  # the learner's own state (Reptile's inner Adam), whatever the guard says
            _assign(extra[k], v)
        trees = {"p": (learned, gp), "m": (meta, gm)}
        targets = [[trees[kind][0][k] for kind, k in keys] for keys in self.keys]
        grads = [[trees[kind][1][k] for kind, k in keys] for keys in self.keys]
        # The norm of every gradient learner.backward would write (the optimizer may hold only some of them).
        flat = [*gp.values(), *((gm[k] for k in norm_meta) if gm else ())]  # (Reptile differentiates no rule)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in flat]))
        finite = torch.isfinite(norm) & torch.isfinite(metrics["loss"])
        if self.clip:
            factor = torch.where(norm > self.clip, self.clip / (norm + 1e-6), torch.ones_like(norm))
            grads = [[g * factor for g in group] for group in grads]
        i = 0
        for index, (group_targets, group_grads) in enumerate(zip(targets, grads, strict=True)):
            lr = lrs[index]
            beta1, beta2, eps = hyper[index]
            for p, g in zip(group_targets, group_grads, strict=True):
                if self.adam:
                    step, avg, square = steps[i], avgs[i], squares[i]
                    new_step = step + 1
                    new_avg = avg.lerp(g, 1 - beta1)
                    new_square = square * beta2 + g * g * (1 - beta2)
                    t = new_step.to(torch.float64)
                    step_size = lr / (1 - beta1**t)
                    root = torch.sqrt(1 - beta2**t)
                    denom = new_square.sqrt() / root.to(p.dtype) + eps
                    new_p = p - step_size.to(p.dtype) * new_avg / denom
                    _assign(step, torch.where(finite, new_step, step))
                    _assign(avg, torch.where(finite, new_avg, avg))
                    _assign(square, torch.where(finite, new_square, square))
                else:
                    new_p = p - lr.to(p.dtype) * g
                _assign(p, torch.where(finite, new_p, p))
                i += 1
        out = torch.stack([norm, finite.to(norm.dtype), *(v.to(norm.dtype).reshape(()) for v in metrics.values())])
        return out, tuple(metrics)


@dataclass(frozen=True)
class Draws:
    """The random numbers of one batch of tasks (``family.draw(...)``), which ``family.assemble`` turns into the
    batch inside the compiled update: a family that splits its ``sample`` so (the sinusoid family) has its
    arithmetic compiled with the step, and only the generator's calls stay eager."""

    family: Any
    values: tuple[Tensor, ...]
    batch_size: int
    shots: int
    queries: int

    def batch(self) -> TaskBatch:
        """The batch, assembled eagerly: bit for bit what ``family.sample`` gives with the same generator state.
        (Inside the compiled update Inductor's float64 ``sin`` may differ from eager's in the last bit for some
        points, which rounding to float32 hides; in float64 training that is a 1e-16 relative difference.)"""
        return self.family.assemble(self.values, self.batch_size, self.shots, self.queries)


def assembles(family: Any) -> bool:
    """Whether ``family`` splits its sampling into ``draw`` (the generator's calls) and ``assemble`` (arithmetic
    only), which the fused update compiles with the step. Not when a subclass overrides ``sample`` but inherits
    ``assemble``: its tasks would no longer be what ``assemble`` builds."""
    names = ("sample", "draw", "assemble")
    if not all(callable(getattr(family, name, None)) for name in names):
        return False
    if any(name in getattr(family, "__dict__", {}) for name in names):  # set on the instance: the class's may not
        return False
    cls = type(family)
    methods = (getattr(cls, "sample", None), getattr(cls, "assemble", None))
    try:
        return _assembling_class(cls, *methods)  # (a method replaced on the class is a new key)
    except TypeError:  # an unhashable callable as a method: not cached
        return _assembling_class.__wrapped__(cls, *methods)


@functools.lru_cache(maxsize=64)
def _assembling_class(family: type, sample: Any, assemble: Any) -> bool:
    # Which classes define the methods: read at every training step, found once per class and methods.
    owners = [next((k for k in family.__mro__ if name in vars(k)), None) for name in ("sample", "assemble")]
    return None not in owners and issubclass(owners[1], owners[0])  # (None: served by __getattr__)


def _assign(target: Tensor, value: Tensor) -> None:
    """``target.copy_(value)`` in the compiled update, through a one-element view where ``target`` has no
    dimensions: ``torch.compile`` (PyTorch 2.13, with AOTAutograd's backends: Inductor, ``aot_eager``) silently
    drops an in-place write to a 0-dim float64 CPU tensor that is an input of the compiled function (Adam's step
    count in float64, a scalar parameter or its moments in float64 training). ``tests/test_fused_update.py`` has
    the canary."""
    if target.dim() == 0:
        target.view(1).copy_(value.reshape(1))
    else:
        target.copy_(value)


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device})  # (learner.autocast: a dtype)


def _plain(obj: Any) -> tuple[Any, ...]:
    """``obj``'s public attributes that are plain values or sequences of them (a task family's ranges and noise)."""
    fields = getattr(obj, "__dict__", {})
    return tuple((k, _frozen(v)) for k, v in fields.items() if k[0] != "_" and _is_plain(v))


def _is_plain(v: Any) -> bool:
    return type(v) in _PLAIN or (type(v) in (tuple, list) and all(type(x) in _PLAIN for x in v))


def _frozen(v: Any) -> Any:
    return tuple(v) if type(v) is list else v  # (a key must hash)


def _settings(learner: MetaLearner) -> tuple[Any, ...]:
    """The public plain Python values (numbers, strings, flags) of the learner and every module in it, and how
    it vectorises: the inner rule's learning rate, ``inner_steps``, ``training``, a layer's ``eps``. A graph
    captured with one of them replays it unchanged, so they key the graphs (Dynamo guards a compiled step on them
    likewise); about 12 µs a call on the sinusoid MLP. Private ones are left out: a module's own counters change
    at every call (CAVIA counts the passes through its context layer)."""
    return (learner.vectorize, *(setting for m in learner.modules() for setting in _plain(m)))


def _device(named: dict[str, Tensor]) -> torch.device:
    return next(iter(named.values())).device


def _dtype(named: dict[str, Tensor]) -> torch.dtype:
    return next(iter(named.values())).dtype


def _fields(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


def _global_step_hooks() -> bool:
    return bool(torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks)


def _ids(optimizer: torch.optim.Optimizer) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(id(p) for p in g["params"]) for g in optimizer.param_groups)
