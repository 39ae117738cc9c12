"""MetaLearner: an ``nn.Module`` around the user's network, with one pure per-task function underneath.

The network is the submodule ``learner.model`` and its ``nn.Parameter`` objects *are* the meta-learned
initialisation; the inner rule's learned tensors (LSLR rates, Meta-SGD rates, curvature factors) are the
parameters of ``learner.rule``. So ``parameters()``, ``state_dict()``, ``.to()``, ``train()``/``eval()`` and any
``torch.optim`` optimizer work as in PyTorch, and the usual loop is::

    opt.zero_grad(); learner.backward(batch); opt.step()

Subclasses write ``task_loss(params, meta, task, weights, first_order)`` for a single task; this base class maps
it over a batch (``torch.func.vmap``, or a plain loop with the same numbers), differentiates it with
``torch.func.grad_and_value`` (exact second order unless ``first_order``; the eager task loop takes the same
derivatives with ``torch.autograd``, without ``torch.func``'s per-operation wrappers), optionally through
``torch.compile``, and provides ``adapt``/``predict`` and the adaptation curves used by evaluation. The functional
core reads the module's tensors (detached aliases, never copies), so nothing goes stale.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from metagrad.errors import CompileError, ConfigError, DataError, MetagradError, ModelError
from metagrad.inner.base import InnerRule, Params
from metagrad.models.norm import make_exact
from metagrad.models.norm import statistics as norm_statistics
from metagrad.named import NamedTensors, ParameterIndex, TensorView
from metagrad.numerics import tf32 as tf32_numerics
from metagrad.task_threads import current_module, in_task_thread, run_tasks, why_not_here, why_not_threaded
from metagrad.tasks.base import TaskBatch, shard_weight
from metagrad.transforms import inner_pass, plain_autograd, transforms_only

__all__ = ["MetaLearner", "LOSSES", "METRICS", "Task"]

# torch.compile modes that capture CUDA graphs on a GPU (see MetaLearner._run_compiled).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

Task = tuple[Tensor, Tensor, Tensor, Tensor]  # support_x, support_y, query_x, query_y of one task
Loss = Callable[[Tensor, Tensor], Tensor]

LOSSES: dict[str, Loss] = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
}


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).to(logits.dtype).mean()


# What evaluation reports for each loss: the loss itself for regression, accuracy for classification.
METRICS: dict[str, tuple[str, Loss]] = {
    "mse": ("mse", F.mse_loss),
    "cross_entropy": ("accuracy", _accuracy),
}
_HIGHER_IS_BETTER = {"accuracy"}


def _autograd(loss: Tensor, inputs: Sequence[Tensor], create_graph: bool) -> list[Tensor]:
    """``torch.autograd.grad`` of ``loss`` with respect to ``inputs``, zeros where it does not depend on one (as
    ``torch.func.grad`` gives)."""
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads: list[Tensor | None] = [None] * len(inputs)
    if loss.requires_grad and wanted:
        found = torch.autograd.grad(loss, [inputs[i] for i in wanted], create_graph=create_graph, allow_unused=True)
        for i, g in zip(wanted, found, strict=True):
            grads[i] = g
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


def _variables(tree: Mapping[str, Tensor]) -> Params:
    """Each tensor as one that autograd differentiates with respect to: a view of it where it is already recorded
    (a weight of the outer graph, so that the inner gradient stays differentiable; a view, so that a use of the
    same tensor through another path, e.g. an ``inner_objective`` that also reads ``params``, is not counted, as
    ``torch.func.grad`` does not count it), else a fresh leaf (the same memory)."""
    return {k: v.view_as(v) if v.requires_grad else v.detach().requires_grad_() for k, v in tree.items()}


def _detach(tree: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in tree.items()}


def _thread_safe_class(cls: type) -> bool:
    """Whether a learner's or inner rule's class may run tasks on several threads at once: as it declares
    (``thread_safe_tasks``, inherited), else if it is metagrad's own (a subclass elsewhere may keep state in
    Python that its tasks would share)."""
    declared = getattr(cls, "thread_safe_tasks", None)
    if declared is not None:
        return bool(declared)
    return cls.__module__.split(".")[0] == "metagrad"


@dataclasses.dataclass
class _TaskThreads:
    """How a call's tasks go to task threads: on ``threads`` at once, after the ``probe`` where there is one;
    ``record``: the call's outcome is what :attr:`MetaLearner.task_loop` reports."""

    threads: int
    probe: _SharingProbe | None
    record: bool = False


# What task_loop says of tasks that the probe saw share something.
_SHARED = "a task wrote a buffer or drew from the global random number generator (the probe)"


class _SharingProbe:
    """Around a task alone on a task thread: records in ``verdicts[key]`` (and ``clean``) whether it left the
    network's buffers and the global random number generator as they were (a task that changes either shares it
    with the others, so tasks on threads would race on it)."""

    def __init__(self, model: nn.Module, verdicts: dict, key: tuple) -> None:
        self.model, self.verdicts, self.key, self.clean = model, verdicts, key, False

    def __enter__(self) -> None:
        self.buffers = list(self.model.buffers())
        self.versions, self.rng = [b._version for b in self.buffers], torch.get_rng_state()

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            versions = [b._version for b in self.buffers]
            self.clean = versions == self.versions and torch.equal(self.rng, torch.get_rng_state())
            self.verdicts[self.key] = self.clean


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__).strip("_<>") or "loss"


# compile()'s Inductor options on the CPU when the caller names no mode (see MetaLearner.compile).
_CPU_INDUCTOR = {"cpp_wrapper": True, "memory_planning": True}

_NO_RANDOMNESS = contextlib.nullcontext()


def _has_running_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in model.modules())


def _is_random(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) or bool(getattr(module, "stochastic", False))


# What torch.func says when a network cannot run under its transforms, and what to do about it.
_TRANSFORM_FAILURES = {
    "in-place operation": "it updates a tensor in place in its forward pass (a buffer or a captured tensor): "
    "compute it out of place, or update it outside the learner",
    "modified by an inplace operation": "it modifies in place a tensor that its derivative needs (e.g. "
    "ReLU(inplace=True) right after a Tanh or Sigmoid, whose derivative reads their output): compute it out of "
    "place",
    "random operation": "it draws random numbers but is not marked as random: set `stochastic = True` on it so "
    "that every task draws its own (as for nn.Dropout)",
    ".item()": "it reads a tensor's value in Python (.item(), bool(), a data-dependent if): keep the computation in "
    "tensors, or pass vectorize=False",
    "data-dependent control flow": "it branches on a tensor's value: keep the computation in tensors, or pass "
    "vectorize=False",
    "Batching rule not implemented": "vmap cannot batch one of its operations: pass vectorize=False",
    "vmap": "vmap cannot batch it: pass vectorize=False",
    "During a grad": "torch.func.grad cannot differentiate it: see the message above",
}


_COMPILED_COPIES = itertools.count()


def _backend_failed(error: BaseException) -> bool:
    """Whether ``error`` is Dynamo's report of a compiler backend's failure (Dynamo is imported only if in use)."""
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(error, exc.BackendCompilerFailed)


def _with_own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function or a bound method) running a copy of its code object. Dynamo keeps compiled graphs on the
    code object, at most ``torch._dynamo.config.recompile_limit`` (8) for one code. Every learner's :meth:`compile`
    would share the code of ``MetaLearner._chunk_gradient``, so from the ninth compiled learner in a process on (a
    sweep in a notebook), the meta-step would run uncompiled, with only Dynamo's warning to say so. A copy per
    :meth:`compile` gives each learner its own cache."""
    bound = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", fn)
    # A name of its own too: Dynamo keys its automatic-dynamic-shape memory on file, line and name, so a shared
    # name would let one learner's shapes make another's first graph dynamic (and slower).
    code = func.__code__.replace(co_name=f"{func.__code__.co_name}_{next(_COMPILED_COPIES)}")
    twin = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    twin.__kwdefaults__, twin.__qualname__ = func.__kwdefaults__, func.__qualname__
    twin.__dict__.update(func.__dict__)
    return types.MethodType(twin, bound) if bound is not None else twin


@dataclasses.dataclass(frozen=True)
class _AdaptOnly:
    """Which parameters the inner loop adapts (``adapt_only``): every one, these names, these name prefixes, or
    those a predicate accepts. A class, not a closure, so that a learner pickles (``torch.save(learner)``)."""

    names: frozenset[str] | None = None
    prefixes: tuple[str, ...] | None = None
    predicate: Callable[[str, Tensor], bool] | None = None

    def __call__(self, name: str, p: Tensor) -> bool:
        if self.names is not None:
            return name in self.names
        if self.prefixes is not None:
            return name.startswith(self.prefixes)
        if self.predicate is not None:
            return bool(self.predicate(name, p))
        return True


class MetaLearner(nn.Module):
    """Shared machinery of every algorithm (see the module docstring).

    ``loss`` is ``"mse"``, ``"cross_entropy"`` or any callable ``(prediction, target) -> scalar``; ``metric``
    (what evaluation reports) defaults to the MSE, the accuracy, or the loss itself. ``adapt_only`` chooses what
    the inner loop adapts: a submodule (``adapt_only=model.head``, ANIL), a predicate ``(name, parameter) ->
    bool`` or name prefixes; parameters with ``requires_grad=False`` are frozen: neither adapted nor
    meta-learned."""

    name = "meta-learner"
    not_meta_learned: frozenset[str] = frozenset()
    """Parameters that the outer loop leaves out though they require grad (CAVIA's context, reset to zero for every
    task): the meta-gradient has no entry for them, so no optimizer moves them; the inner loop may still adapt them."""
    thread_safe_tasks: bool | None = None
    """Whether this class's per-task code (``task_loss`` and what it calls) may run tasks on several threads at
    once (:attr:`task_threads`): ``None`` decides by where the class is defined (metagrad's own: yes; a subclass
    elsewhere: no, as it may keep Python state that its tasks would share). A subclass whose per-task code only
    computes from its arguments, through :meth:`network`, may declare ``True``."""

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule,
        *,
        inner_steps: int,
        loss: str | Loss = "mse",
        metric: str | Loss | None = None,
        vectorize: bool | int | str = "auto",
        eval_rule: InnerRule | None = None,
        adapt_only: nn.Module | Callable[[str, Tensor], bool] | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if inner_steps < 0:
            raise ConfigError(f"inner_steps must be >= 0, got {inner_steps}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(rule, InnerRule):
            raise ConfigError(f"rule must be a metagrad InnerRule (an nn.Module), got {type(rule).__name__}")
        self.loss_name, self.loss_fn = self._resolve_loss(loss)
        self.metric_name, self.metric_fn = self._resolve_metric(metric)
        make_exact(model)  # PyTorch's batch/layer norm kernels are wrong under vmap of grad of grad
        self.model = model
        self.__dict__["_indexes"] = {}  # ParameterIndex per module: see _named_parameters
        self.rule = rule
        # Not a submodule of its own: the same rule (or a parameterless one), never a second copy in state_dict.
        self.__dict__["eval_rule"] = eval_rule if eval_rule is not None else rule
        self.inner_steps = int(inner_steps)
        self.vectorize = vectorize
        self.task_threads = "auto"
        # A model whose forward takes the inner step (Conv4 with per-step batch norm, MAML++).
        self.per_step = bool(getattr(model, "per_step", False))
        self.random = any(_is_random(m) for m in model.modules())
        # How query images are normalised by batch norms with running statistics: "batch" (transductive, MAML++)
        # or "running" (inductive: each query on its own); None follows train() / eval(). The support set is
        # always normalised with its own statistics.
        self.query_statistics: str | None = None
        # Whether the meta-step also reports diagnostics that cost work of their own (MAML's ``pre_loss``: the
        # query loss before adaptation, one more forward pass of the query set per task, without a graph). Off,
        # ``backward`` does only what the meta-gradient needs.
        self.diagnostics = True
        # Mixed precision for the network's forward passes (torch.autocast's dtype, e.g. torch.bfloat16) or None.
        # Batch norms still compute in float32. Measured by benchmarks/precision.py: bfloat16 is far outside the
        # meta-gradient's tolerance (see docs/results.md), so it is off unless asked for.
        self.autocast: torch.dtype | None = None
        # Float32-precise batch statistics on the CPU for channels-last activations (metagrad.models.norm.
        # _PreciseBatchNorm: with PyTorch's channels-last kernel a Conv-4 meta-gradient is 5.7e-4 from float64,
        # 2.5e-4 with this); False saves two passes over each such batch norm's input.
        # Only PyTorch's fused batch norm needs it: per-step batch norm computes its statistics itself.
        self.precise_norms = True
        # Whether a GPU's cuDNN convolutions may use TF32 within the learner's calls (PyTorch lets them by
        # default; measured 200 times further from float64 than float32: metagrad.numerics).
        self.tf32 = False
        self._select = self._selector(adapt_only)
        if not self.fast:
            raise ConfigError(f"adapt_only={adapt_only!r} matches no trainable parameter of the model")
        self.rule.bind({n: p.detach() for n, p in self.params.items() if n in self.fast})
        self.extra = NamedTensors(learned=False)  # non-learned state that must survive a checkpoint
        self.register_buffer("backward_calls", torch.zeros((), dtype=torch.int64))
        self._compiled: Callable[..., Any] | None = None
        self._compile_options: dict[str, Any] = {}  # what compile() was given, for a deep copy to compile alike
        self._torch_compile_options: dict[str, Any] = {}  # what torch.compile got, options resolved
        self._cuda_graphs = False
        self._x_ndim: int | None = None
        self._output_shapes: dict[tuple, tuple[int, ...]] = {}

    @classmethod
    def from_config(cls, options: Any, model: nn.Module, spec: Any) -> MetaLearner:
        """Build from a config's ``[algorithm]`` options (a dataclass): its fields are passed as keyword
        arguments, with the task's loss and metric and the trainer's batching path (see metagrad.registry)."""
        values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
        return cls(model, **cls.spec_options(spec), **values)

    @staticmethod
    def spec_options(spec: Any) -> dict[str, Any]:
        """The constructor arguments every algorithm takes from the task spec: loss, metric, batching path."""
        return {"loss": spec.loss, "metric": spec.metric, "vectorize": spec.vectorize}

    @staticmethod
    def last_layer(model: nn.Module) -> nn.Module:
        """What ANIL adapts: the model's ``head`` if it has one, else its last ``nn.Linear``."""
        head = getattr(model, "head", None)
        if isinstance(head, nn.Module):
            return head
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ConfigError(f"{type(model).__name__} has no head and no nn.Linear for ANIL to adapt")
        return linear[-1]

    @property
    def iteration(self) -> int:
        """backward() calls made without an explicit iteration: the schedule's clock of a module-API loop (a
        buffer, so that ``state_dict()`` carries it and a resumed loop keeps first-order iterations and MSL)."""
        return int(self.backward_calls)

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.backward_calls.fill_(int(value))

    # ----- construction helpers -------------------------------------------------------------------------
    @staticmethod
    def _resolve_loss(loss: str | Loss) -> tuple[str, Loss]:
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ConfigError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
            return loss, LOSSES[loss]
        if not callable(loss):
            raise ConfigError(f"loss must be a string or a callable (prediction, target) -> scalar, got {loss!r}")
        return _name_of(loss), loss

    def _resolve_metric(self, metric: str | Loss | None) -> tuple[str, Loss]:
        if metric is None:
            return METRICS.get(self.loss_name, (self.loss_name, self.loss_fn))
        if isinstance(metric, str):
            named = {"mse": F.mse_loss, "accuracy": _accuracy, "cross_entropy": F.cross_entropy}
            if metric not in named:
                raise ConfigError(f"metric must be one of {sorted(named)} or a callable, got {metric!r}")
            return metric, named[metric]
        if not callable(metric):
            raise ConfigError(f"metric must be a string or a callable (prediction, target) -> scalar, got {metric!r}")
        return _name_of(metric), metric

    def _selector(self, adapt_only: Any) -> Callable[[str, Tensor], bool]:
        if adapt_only is None:
            return _AdaptOnly()
        if isinstance(adapt_only, nn.Module):
            ids = {id(p) for p in adapt_only.parameters()}
            if not ids or not ids <= {id(p) for p in self.model.parameters()}:
                raise ConfigError("adapt_only must be a submodule of the model that holds parameters")
            # By name, not by object: a deep copy of the learner holds new parameter objects under the same names.
            return _AdaptOnly(names=frozenset(n for n, p in self.model.named_parameters() if id(p) in ids))
        if isinstance(adapt_only, str | bytes) or not isinstance(adapt_only, Sequence):
            if callable(adapt_only):
                return _AdaptOnly(predicate=adapt_only)
            raise ConfigError(f"adapt_only must be a module, a predicate or name prefixes, got {adapt_only!r}")
        return _AdaptOnly(prefixes=tuple(adapt_only))

    # ----- the module's tensors, as the functional core names them ---------------------------------------
    @property
    def params(self) -> TensorView:
        """The network's parameters by name (live: assignment copies in place)."""
        return TensorView(self._named_parameters)

    @property
    def meta_state(self) -> TensorView:
        """The inner rule's learned tensors by name (live)."""
        return self.rule.learned.view()

    @property
    def extra_state(self) -> TensorView:
        """Non-learned state that a checkpoint keeps (e.g. Reptile's inner Adam moments)."""
        return self.extra.view()

    @property
    def buffers(self) -> TensorView:
        """The network's buffers (batch-norm running statistics) by name (live)."""
        return TensorView(lambda: dict(self.model.named_buffers()))

    def _named_parameters(self, module: nn.Module | None = None) -> dict[str, nn.Parameter]:
        """``dict(module.named_parameters())`` (default the network's), cached while the module's structure is
        unchanged (:class:`~metagrad.named.ParameterIndex`): the per-iteration calls read it several times."""
        module = self.model if module is None else module
        index = self._indexes.get(id(module))
        if index is None or index.module is not module:
            index = self._indexes[id(module)] = ParameterIndex(module)
        return index()

    def _learned_tensors(self) -> dict[str, nn.Parameter]:
        """``self.rule.learned.tensors()`` (the rule's learned tensors by dotted name), rebuilt only when the
        index of their module changes."""
        escaped = self._named_parameters(self.rule.learned)
        memo = self.__dict__.get("_learned_memo")
        if memo is None or memo[0] is not escaped:  # the memo holds the dict: its identity cannot be reused
            memo = self.__dict__["_learned_memo"] = (escaped, self.rule.learned.tensors())
        return memo[1]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """:meth:`nn.Module.zero_grad`, over a cached index of the learner's parameters."""
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for p in self._named_parameters(self).values():
            if p.grad is not None:
                p.grad = None

    @property
    def trainable(self) -> list[str]:
        """Names of the meta-learned parameters: every one with ``requires_grad``, less :attr:`not_meta_learned`."""
        return [n for n, p in self._named_parameters().items() if p.requires_grad and n not in self.not_meta_learned]

    @property
    def fast(self) -> list[str]:
        """Names of the parameters adapted in the inner loop: trainable, chosen by ``adapt_only``, and not
        meta-learned in the outer loop only (``model.meta_only``: per-step batch norm)."""
        meta_only = tuple(getattr(self.model, "meta_only", ()))
        return [
            n
            for n, p in self._named_parameters().items()
            if p.requires_grad and self._select(n, p) and not (meta_only and n.startswith(meta_only))
        ]

    @property
    def legacy_names(self) -> dict[str, str]:
        """Older checkpoint names of this learner's tensors (by their present names), for loading old runs."""
        return {}

    def state_tensors(self) -> dict[str, TensorView]:
        """What a checkpoint holds, by group (live views)."""
        return {"params": self.params, "meta": self.meta_state, "extra": self.extra_state, "buffers": self.buffers}

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The network at the meta-learned initialisation (``learner(x)`` is ``learner.model(x)``)."""
        return self.model(x, *args, **kwargs)

    def _numerics(self, ref: Tensor) -> contextlib.AbstractContextManager[None]:
        """Full float32 in the GPU's kernels within a call, unless ``tf32`` (nothing to set on the CPU)."""
        return tf32_numerics(self.tf32) if ref.is_cuda else contextlib.nullcontext()

    # ----- pure functions of (params, ...) ------------------------------------------------------------
    def network(
        self, params: Mapping[str, Tensor], x: Tensor, step: int = 0, statistics: str = "batch", track: bool = False
    ) -> Tensor:
        """The network with ``params`` on ``x``. ``statistics`` picks the batch norms' normalisation (``"batch"``
        or ``"running"``, for layers that have running statistics) and ``track`` whether this pass updates them
        (only ever outside the transforms). Per-step batch norm: ``step`` (inner steps taken so far) selects the
        rows."""
        if self.autocast is not None:
            dtype = next(iter(params.values())).dtype
            with torch.autocast(x.device.type, self.autocast):
                out = self._forward(params, x, step, statistics, track)
            return out.to(dtype) if out.is_floating_point() else out
        return self._forward(params, x, step, statistics, track)

    def _forward(self, params: Mapping[str, Tensor], x: Tensor, step: int, statistics: str, track: bool) -> Tensor:
        # On a task thread, the thread's own shell of the network (functional_call swaps its tensors in place).
        module = self.model if torch.compiler.is_compiling() else current_module(self.model)
        tensors = (dict(params), dict(self.model.named_buffers()))
        if self.per_step:
            options = {"step": step, "statistics": statistics, "track": track}
            return functional_call(module, tensors, (x,), options)
        with norm_statistics(statistics, track, self.precise_norms):
            return functional_call(module, tensors, (x,))

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        return self.loss_fn(self.network(params, x, step), y)

    def inner_step(
        self,
        params: Params,
        meta: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        step: int,
        rule: InnerRule,
        first_order: bool,
        state: Mapping[str, Tensor] | None = None,
        anchor: Params | None = None,
    ) -> tuple[Params, Params]:
        """One inner update ``θ ← θ − rule(∇θ inner_objective, step)`` of the adapted (``fast``) parameters;
        returns the new weights and the rule's new state (``state=None``: the rule's initial state). ``anchor`` is
        what :meth:`inner_anchor` gave at the start of this adaptation."""
        fast = self.fast
        if state is None:
            state = rule.init_state({k: params[k] for k in fast})

        def objective(adapted: Params) -> Tensor:
            return self.inner_objective(params, adapted, x, y, step, anchor)

        adapted = {k: params[k] for k in fast}
        if plain_autograd():  # the task loop, eagerly (see _chunk_gradient)
            # Second order where something outside records this step (the meta-gradient's graph).
            create_graph = not first_order and torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
            with inner_pass(), torch.enable_grad():
                adapted = _variables(adapted)
                grads = _autograd(objective(adapted), list(adapted.values()), create_graph)
            self._refuse_buffer_writes()
            g = dict(zip(adapted, grads, strict=True))
        else:
            with inner_pass():
                g = grad(objective)(adapted)
        if first_order:
            # First-order MAML: the adapted weights depend on θ only through the identity path.
            g = _detach(g)
        update, state = rule.update_with_state(g, state, meta, step)
        return {**params, **{k: params[k] - update[k] for k in fast}}, state

    def _refuse_buffer_writes(self) -> None:
        """After a pass differentiated with torch.autograd: a module that wrote into one of its buffers from the
        graph (an in-place update inside the forward pass, which torch.func refuses) fails as under torch.func. The
        buffer is cut loose first: holding the graph, it would chain every later iteration's graph onto it."""
        touched = [b for b in self.model.buffers() if b.grad_fn is not None]
        for b in touched:
            b.detach_()
        if touched:
            raise RuntimeError("a buffer of the model was updated by an in-place operation from the graph")

    def inner_objective(
        self, params: Params, adapted: Params, x: Tensor, y: Tensor, step: int, anchor: Params | None = None
    ) -> Tensor:
        """What an inner step descends: the support loss of ``{**params, **adapted}``. An algorithm whose inner
        problem is another (iMAML: a proximal term around ``anchor``) overrides this and :meth:`inner_anchor`."""
        return self.loss({**params, **adapted}, x, y, step)

    def inner_anchor(self, params: Params) -> Params | None:
        """What :meth:`inner_objective` needs from the weights an adaptation starts at (None: nothing)."""
        return None

    def descend(
        self, params: Params, meta: Params, x: Tensor, y: Tensor, steps: int, rule: InnerRule | None = None
    ) -> Params:
        """``steps`` inner steps of ``rule`` (default the evaluation rule) from ``params`` on one task's support
        set, detached after each (nothing is differentiated through them): how :meth:`adapt` adapts."""
        rule = self.eval_rule if rule is None else rule
        anchor = self.inner_anchor(params)
        state = None
        for s in range(steps):
            params, state = self.inner_step(params, meta, x, y, s, rule, True, state, anchor)
            params, state = _detach(params), _detach(state)
        return params

    def metric(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, step: int = 0) -> Tensor:
        """What evaluation reports on query points: the MSE for regression, accuracy for classification."""
        return self.metric_fn(self.network(params, x, step, self.query_mode()), y)

    @property
    def metric_higher_is_better(self) -> bool:
        return self.metric_name in _HIGHER_IS_BETTER

    def query_mode(self) -> str:
        """The statistics query images are normalised with now (see ``query_statistics``)."""
        if self.query_statistics is not None:
            return self.query_statistics
        return "batch" if self.training else "running"

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outer loss of one task and detached diagnostics; written by each algorithm."""
        raise NotImplementedError

    # ----- batching ---------------------------------------------------------------------------------
    def map_tasks(
        self, fn: Callable[..., Any], shared: tuple, tasks: tuple[Tensor, ...], kind: str | None = None
    ) -> Any:
        """``fn(*shared, tasks_i)`` for every task i, stacked: vmap, or a plain loop with the same numbers (on task
        threads where they share nothing: :attr:`task_threads`). ``kind`` names the call for that choice (default
        ``fn``'s name); ``"meta-gradient"`` (a meta-step built on it: Reptile's, iMAML's) is what
        :attr:`task_loop` reports.

        Random layers (dropout) in training draw different randomness for every task."""
        n = tasks[0].shape[0]
        threads = self._threads_for_tasks(n, False, kind or getattr(fn, "__name__", "map_tasks"))
        if self.vmapped:
            in_dims = (None,) * len(shared) + (0,)
            randomness = "different" if self.random and self.model.training else "error"
            return vmap(fn, in_dims=in_dims, randomness=randomness)(*shared, tasks)
        items = [tuple(t[i] for t in tasks) for i in range(n)]

        def one(task: tuple[Tensor, ...]) -> Any:
            return fn(*shared, task)

        outs = list(map(one, items)) if threads is None else self._on_task_threads(one, items, threads)
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    def meta_loss(
        self, params: Params, meta: Params, tasks: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean over ``tasks`` of the outer loss, and of each diagnostic."""
        n = tasks[0].shape[0]
        loss, aux = self._loss_sum(params, meta, tasks, weights, first_order)
        return loss / n, {k: v / n for k, v in aux.items()}

    def _loss_sum(
        self, params: Params, meta: Params, tasks: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        def one(p: Params, m: Params, w: Tensor | None, task: Task) -> tuple[Tensor, dict[str, Tensor]]:
            return self.task_loss(p, m, task, w, first_order)

        losses, aux = self.map_tasks(one, (params, meta, weights), tasks)
        return losses.sum(), {k: v.sum() for k, v in aux.items()}

    def _chunk_gradient(
        self,
        params: Params,
        frozen: Params,
        meta: Params,
        tasks: Task,
        weights: Tensor | None,
        first_order: bool,
        scale: float = 1.0,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """Gradients of ``scale`` times the summed meta-loss of one chunk of tasks, and the scaled metrics (the unit
        that is vmapped and compiled; ``scale`` is 1 / the batch's tasks, so that one chunk needs no more ops)."""

        def objective(p: Params, m: Params) -> tuple[Tensor, dict[str, Tensor]]:
            loss, aux = self._loss_sum({**frozen, **p}, m, tasks, weights, first_order)
            return loss * scale, {k: v * scale for k, v in aux.items()}

        if self.vmapped or not plain_autograd():
            (gp, gm), (loss, aux) = grad_and_value(objective, argnums=(0, 1), has_aux=True)(params, meta)
            return gp, gm, {"loss": loss, **aux}
        # The task loop, eagerly: the same derivatives with torch.autograd, without torch.func's wrappers.
        with torch.enable_grad():
            p = {k: v.detach().requires_grad_() for k, v in params.items()}
            m = {k: v.detach().requires_grad_() for k, v in meta.items()}
            loss, aux = objective(p, m)
            grads = _autograd(loss, [*p.values(), *m.values()], create_graph=False)
        self._refuse_buffer_writes()
        gp, gm = dict(zip(p, grads[: len(p)], strict=True)), dict(zip(m, grads[len(p) :], strict=True))
        return gp, gm, {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}

    @property
    def vectorize(self) -> bool | int | str:
        """How tasks are batched: ``True`` (one ``vmap`` over all), ``False`` (one after another), ``k`` (``vmap``
        over k at a time) or ``"auto"``: ``vmap``, except for a network that convolves on the CPU, where per-task
        weights turn each convolution into a grouped one and batch norm into its composite form, and the task loop
        with PyTorch's own kernels was measured 1.5-2.9× faster in a tenth of the memory (``benchmarks/conv4.py``).
        On a GPU ``"auto"`` keeps ``vmap``: one task at a time would be hundreds of tiny kernel launches."""
        return self.__dict__["_vectorize"]

    @vectorize.setter
    def vectorize(self, value: bool | int | str) -> None:
        if not (isinstance(value, bool) or value == "auto" or (isinstance(value, int) and value > 0)):
            raise ConfigError(f"vectorize must be true, false, 'auto' or a positive number of tasks, got {value!r}")
        if value == "auto":
            # None: decided by the device at each call (the learner may be moved after it is built).
            vmapped = None if self._convolves() else True
        else:
            vmapped = value is True or (value is not False and int(value) > 1)
        self.__dict__["_vectorize"], self.__dict__["_vmapped"] = value, vmapped

    def _convolves(self) -> bool:
        """Whether the network has a convolution (what ``vectorize="auto"`` and :meth:`compile` decide by)."""
        return any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())

    @property
    def vmapped(self) -> bool:
        """Whether tasks run under ``vmap`` now (else one after another); see :attr:`vectorize`."""
        vmapped = self.__dict__["_vmapped"]
        if vmapped is None:
            return next(self.model.parameters()).device.type != "cpu"
        return vmapped

    @property
    def task_threads(self) -> int | str:
        """How many CPU threads the eager task loop runs whole tasks on at once (:mod:`metagrad.task_threads`):
        ``"auto"`` (PyTorch's intra-op threads, ``torch.get_num_threads()``), ``k``, or ``1`` (one task at a
        time, every thread on its operators). Each task runs with one intra-op thread and the tasks' gradients are
        summed in task order, so the meta-gradient is the one-thread loop's to the bit; memory holds one task's
        graph per thread. Only where nothing is shared between tasks (the CPU, the task loop, eagerly, no random
        layer in training, no hook on the network, ...: :meth:`_threads_for_tasks`); elsewhere one task at a
        time."""
        return self.__dict__["_task_threads"]

    @task_threads.setter
    def task_threads(self, value: int | str) -> None:
        if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0)):
            raise ConfigError(f"task_threads must be 'auto' or a positive number of threads, got {value!r}")
        self.__dict__["_task_threads"] = value

    @property
    def task_loop(self) -> str:
        """How the tasks of the last eager meta-gradient ran, in words: vectorised, side by side on task threads,
        or one at a time and why (a hook on the network, dropout, one thread, ...: :attr:`task_threads`).
        ``metagrad train`` prints it."""
        if self._compiled is not None:
            if self.vmapped:
                return self._vectorised() + " in the compiled step"
            return "one task at a time in the compiled step (torch.compile is not thread-safe in PyTorch 2.13)"
        return self.__dict__.get("_task_loop", "no meta-gradient yet")

    def _vectorised(self) -> str:
        v = self.vectorize
        return "vectorised (vmap)" + ("" if isinstance(v, bool | str) else f", {int(v)} tasks a call")

    def _threads_for_tasks(self, tasks: int, compiled: bool, kind: str) -> _TaskThreads | None:
        """Whether this call's tasks go to task threads (None: one after another on the caller's thread; see
        :attr:`task_threads`), and how: the first call of its ``kind`` (and training mode) that could go there, with
        three tasks or more, first runs its first task alone on one task thread, under a probe that records whether
        the task wrote a buffer or drew from the global random number generator, which threads would share (that
        call's and every later call's tasks then stay one after another). (On a task thread rather than the
        caller's: with freed memory kept, each thread's heap keeps its peak, and the caller's would keep activations
        it no longer needs.) A meta-gradient's eager call records the choice, in words, for :attr:`task_loop`."""
        how, why = self._task_thread_choice(tasks, compiled, kind)
        record = kind == "meta-gradient" and bool(why) and not torch.compiler.is_compiling()
        if record:
            self.__dict__["_task_loop"] = why
        if how is not None:
            how.record = record
        return how

    def _task_thread_choice(self, tasks: int, compiled: bool, kind: str) -> tuple[_TaskThreads | None, str]:
        if compiled or torch.compiler.is_compiling() or in_task_thread():
            # (task_loop says so for a compiled step; a task thread's own call says nothing; Dynamo traces no
            # thread-local state)
            return None, ""
        if self.vmapped:
            return None, self._vectorised()
        alone = "one task at a time: "
        if tasks < 2:
            return None, alone + "a single task"
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            return None, alone + f"on {device.type} (tasks go side by side on the CPU's threads only)"
        if not plain_autograd():
            return None, alone + "inside torch.func transforms or inference mode"
        v = self.task_threads
        threads = torch.get_num_threads() if v == "auto" else int(v)
        if threads < 2:
            one = "one CPU thread (torch.get_num_threads() is 1: train.threads sets it)"
            return None, alone + ("task_threads = 1" if v != "auto" else one)
        here = why_not_here()
        if here is not None:
            return None, alone + here
        if self.random and self.model.training:
            return None, alone + "the network draws random numbers in training (dropout), in task order"
        foreign = self._foreign_code()
        if foreign is not None:
            return None, alone + f"{foreign} is defined outside metagrad and does not declare thread_safe_tasks = True"
        shared = why_not_threaded(self.model)
        if shared is not None:
            return None, alone + shared
        key = (id(self.model), kind, self.training, self.model.training)
        verdicts = self.__dict__.setdefault("_tasks_share_nothing", {})
        if verdicts.get(key) is False:
            return None, alone + _SHARED
        if key not in verdicts and tasks < 3:  # (a probe of two tasks would leave one: nothing side by side)
            return None, alone + "two tasks (the first call of three or more probes whether tasks share anything)"
        how = _TaskThreads(threads, None if key in verdicts else _SharingProbe(self.model, verdicts, key))
        side = min(threads, tasks - (how.probe is not None))  # (run_tasks: never more threads than tasks)
        return how, f"side by side on {side} threads"

    def _on_task_threads(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        how: _TaskThreads,
        combine: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """``fn`` over ``items`` as :meth:`_threads_for_tasks` decided: the probe's first item alone on a task
        thread, then the rest side by side, or, if the probe saw the tasks share something, on this thread."""
        done: list[Any] = []
        if how.probe is not None:
            with how.probe:
                done = run_tasks(fn, items[:1], 1, self.model, combine)
            items = items[1:]
            if not how.probe.clean:
                if how.record:
                    self.__dict__["_task_loop"] = "one task at a time: " + _SHARED
                rest = [fn(item) for item in items]
                if combine is None:
                    return done + rest
                for out in rest:
                    combine(out)
                return []
        return done + run_tasks(fn, items, how.threads, self.model, combine)

    def _foreign_code(self) -> str | None:
        """The first of this learner's and its inner rules' classes that may not run tasks on several threads (by
        name), or None: metagrad's own may, and so may a class that declares ``thread_safe_tasks = True`` (its
        per-task code touches nothing shared)."""
        rules = [m for r in (self.rule, self.eval_rule) for m in r.modules() if isinstance(m, InnerRule)]
        return next((type(x).__qualname__ for x in (self, *rules) if not _thread_safe_class(type(x))), None)

    def task_chunk(self, tasks: int) -> int:
        """How many tasks one (vmapped, compiled) meta-gradient call takes: all with ``vectorize=True``, ``k``
        with ``vectorize=k``, one where tasks are not vmapped. Chunks are differentiated one after another and
        their gradients summed, so memory holds one chunk's graph only."""
        v = self.vectorize
        if not self.vmapped:
            return 1
        return tasks if isinstance(v, bool | str) else min(int(v), tasks)

    def _meta_gradient(
        self,
        params: Params,
        frozen: Params,
        meta: Params,
        tasks: Task,
        weights: Tensor | None,
        first_order: bool,
        eager: bool = False,
        scale: float | None = None,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """The chunks' gradients (:meth:`task_chunk`), one after another and summed, of ``scale`` (default 1 / the
        tasks) times the summed meta-loss; compiled unless ``eager``."""
        n = tasks[0].shape[0]
        size = self.task_chunk(n)
        compiled = self._compiled is not None and not eager
        fn = self._compiled if compiled else self._chunk_gradient
        scale = 1.0 / n if scale is None else scale
        chunks = [tasks] if size >= n else [tuple(t[i : i + size] for t in tasks) for i in range(0, n, size)]

        def one(chunk: Task) -> tuple[Params, Params, dict[str, Tensor]]:
            args = (params, frozen, meta, chunk, weights, first_order, scale)
            return self._run_compiled(fn, *args) if compiled else fn(*args)

        total: list[dict[str, Tensor]] = []
        threads = self._threads_for_tasks(len(chunks), compiled, "meta-gradient")
        if threads is None:
            for chunk in chunks:
                out = one(chunk)
                # Out of place: a compiled graph may return one buffer for two equal outputs.
                if total:
                    total = [{k: a[k] + b[k] for k in a} for a, b in zip(total, out, strict=True)]
                else:
                    total = list(out)
        else:

            def add(out: tuple[Params, Params, dict[str, Tensor]]) -> None:  # in task order (see run_tasks)
                if not total:
                    total.extend({k: v.clone() for k, v in tree.items()} for tree in out)
                else:  # in place, the same sums as out of place above
                    for a, b in zip(total, out, strict=True):
                        for k in a:
                            a[k].add_(b[k])

            self._on_task_threads(one, chunks, threads, add)
        gp, gm, metrics = total
        return gp, gm, metrics

    # ----- what the trainer calls ---------------------------------------------------------------------
    def schedule(self, iteration: int) -> tuple[Tensor | None, bool]:
        """Per-iteration training options: multi-step loss weights and whether to use first order."""
        return None, False

    def compile(self, **options: Any) -> None:  # type: ignore[override]
        """Run the meta-gradient through ``torch.compile`` from now on (``nn.Module.compile`` would compile
        ``forward``, the plain network, which is not what training runs). ``options`` go to ``torch.compile``.

        On the CPU, with Inductor and no ``options`` of the caller's (``docs/results.md``):

        - ``post_grad_custom_post_pass``: :func:`~metagrad.graph_passes.cpu_passes`.
          :class:`~metagrad.matmul_orientation.BatchedMatmulOrientation` computes the narrow batched products of
          per-task layers transposed, where oneMKL is several times faster (on x86 with MKL, where it was
          measured); :class:`~metagrad.outer_products.OuterProducts` computes ``[M, 1] @ [1, N]`` products
          element-wise (there too); :class:`~metagrad.permuted_reduction.PermutedReduction` sums a transposed
          per-task gradient over the tasks in its own memory order. A ``mode`` is passed on as the options it
          stands for (``torch._inductor.list_mode_options``, as ``torch.compile`` itself does) plus these.
        - ``cpp_wrapper`` when no ``mode`` is given either: Inductor writes the code that calls its kernels in
          C++. On the sinusoid MAML step that compiled 30-45 % faster from cold (fewer C++ builds) and ran a few
          percent faster. (Built apart from the kernels, ``cpp_wrapper_build_separate``, it compiled 0.7 s and
          3.2 s faster from cold but ran 3 % and 1 % slower: not chosen, ``docs/results.md``.)
        - ``memory_planning``, when no ``mode`` is given and the network has no convolution: the step's
          intermediate tensors are carved out of one allocation per call instead of one each (49 on the sinusoid
          step). That took 2-4 % off a sinusoid training iteration at one inner step and cost 1-2 % at five, with
          the same weights to the bit (``benchmarks/compile_ab.py``). On Conv-4's five-step meta-step (PyTorch
          2.13) Inductor's planner recursed past Python's limit and the compile failed (``RecursionError``).
          (Leaving out the compiled code's own checks of its inputs' sizes and
          strides, ``size_asserts``, gained at most a few percent, mostly within the noise: not worth a safety
          check, ``docs/results.md``.)
        - ``cpp.vec_isa_ok``, unless already set (``TORCHINDUCTOR_VEC_ISA_OK``): Inductor takes the vector
          instruction sets that the CPU reports (CPUID) instead of compiling and loading a probe library for each
          (8.6 s on a new machine, 1.4 s on every later start): the sinusoid step's cold compile fell from 16.4 s
          to 9.2 s (``benchmarks/cold_compile.py``). It still probes the extensions it would use (AVX-512 BF16,
          VNNI, AMX). A compiler too old for the CPU (GCC < 8 on an AVX-512 VNNI machine) then fails at the first
          compile instead of falling back to AVX2.

        Call it after moving the learner to its device."""
        self._compile_options = dict(options)
        backend = options.get("backend", "inductor")
        on_cpu = all(p.device.type == "cpu" for p in self.parameters())
        mode = options.get("mode")
        if on_cpu and backend == "inductor" and "options" not in options:
            from torch._inductor import config as inductor_config  # imports Inductor: only when used
            from torch._inductor import list_mode_options

            from metagrad.graph_passes import cpu_passes

            inductor = dict(_CPU_INDUCTOR) if mode is None else dict(list_mode_options(mode, options.get("dynamic")))
            if self._convolves():
                inductor.pop("memory_planning", None)  # Inductor's planner overflowed the recursion limit on Conv-4
            inductor["post_grad_custom_post_pass"] = cpu_passes()
            if inductor_config.cpp.vec_isa_ok is None:  # unless TORCHINDUCTOR_VEC_ISA_OK or the caller decided
                inductor["cpp.vec_isa_ok"] = True
            options = {k: v for k, v in options.items() if k != "mode"} | {"options": inductor}
        self._torch_compile_options = options  # what torch.compile got (metagrad.fused_update compiles alike)
        self._compiled = torch.compile(_with_own_code(self._compile_target()), **options)
        chosen = options.get("options") or {}
        self._cuda_graphs = mode in CUDA_GRAPH_MODES or bool(chosen.get("triton.cudagraphs"))

    def __copy__(self) -> MetaLearner:
        """A shallow copy (shared network and tensors), compiled again if this learner is compiled (see
        :meth:`__deepcopy__`)."""
        new = type(self).__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> MetaLearner:
        """A deep copy, compiled again with the same options if this learner is compiled: the compiled meta-step
        is bound to this learner and would read its settings (``inner_steps``, the inner rule), not the copy's."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        # The compile options as they are (the same objects: an Inductor pass instance, a user's backend).
        new.__setstate__({k: v if k == "_compile_options" else copy.deepcopy(v, memo) for k, v in state.items()})
        return new

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or a pickle (``torch.save(learner)``, multiprocessing) holds: not the compiled step (bound to
        this learner, and a compiled function does not pickle), which :meth:`__setstate__` compiles again with the
        same options, nor the caches of parameter lookups, which are rebuilt."""
        state = dict(self.__dict__)
        state.pop("_learned_memo", None)
        compiled = self._compiled is not None
        return state | {"_compiled": None, "_indexes": {}, "_compile_options": dict(self._compile_options),
                        "_pickled_compiled": compiled}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        compiled = state.pop("_pickled_compiled", False)
        state.setdefault("_task_threads", "auto")  # (a learner pickled before task threads)
        super().__setstate__(state)
        if compiled:
            self.compile(**self._compile_options)

    @staticmethod
    def _on_cuda(params: Mapping[str, Tensor]) -> bool:
        """Whether the compiled step runs on a GPU (CUDA graphs are captured only there)."""
        return next(iter(params.values())).is_cuda

    def _compile_target(self) -> Callable[..., Any]:
        """The pure function :meth:`compile` compiles: the chunk gradient (Reptile: its whole step)."""
        return self._chunk_gradient

    # ----- the meta-step inside the trainer's fused update (metagrad.fused_update) ------------------------------
    def _step_draws(self, tasks: int, points: int, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        """Random numbers the meta-step draws from the trainer's generator besides the tasks' (eagerly, right
        after them, as the separate path draws them): none here; Reptile's mini-batches. ``points``: a task's
        support and query points together."""
        return ()

    def _fused_gradient(
        self,
        learned: Params,
        frozen: Params,
        meta: Params,
        tasks: Task,
        weights: Tensor | None,
        first_order: bool,
        scale: float,
        draws: tuple[Tensor, ...],
        extra: Params,
    ) -> tuple[Params, Params, dict[str, Tensor], Params]:
        """The meta-step that the fused update compiles with the optimizer's step: what :meth:`_meta_step` computes
        for the whole batch in one process, plus the new values of ``extra`` (:attr:`extra_state`'s tensors) that
        it writes. A learner with a meta-step of its own (Reptile) overrides this and :meth:`_step_draws` to
        train through the fused update too. Tasks in chunks (``vectorize=k``, or ``False``: one at a time) are
        differentiated one chunk after another and summed by :meth:`_meta_gradient` (in the eager update that
        a CUDA graph replays; a compiled fused update is built for one chunk only)."""
        return (*self._meta_gradient(learned, frozen, meta, tasks, weights, first_order, eager=True, scale=scale), {})

    def _run_compiled(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the compiled meta-step. Under CUDA graphs (``compile(mode="reduce-overhead")`` on a GPU) its
        outputs live in the graph's static memory, which the next replay overwrites (the next chunk's, or the
        next iteration's while the optimizer may still read ``.grad``): every call starts a new graph step and
        its outputs are copied out."""
        if not (self._cuda_graphs and self._on_cuda(args[0])):
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, fn(*args))

    def _task_randomness(
        self, generator: torch.Generator | None, device: torch.device, rank: int = 0
    ) -> contextlib.AbstractContextManager[None]:
        """Random layers draw from a seed taken from ``generator`` (the trainer's, checkpointed), so that a resumed
        run stays bit-identical; each distributed rank offsets it by its rank, so that shards draw different masks
        (the masks then differ from one process's: dropout runs are reproducible per world size). The global RNG,
        CPU and CUDA, is left as it was."""
        if not (self.random and self.model.training and generator is not None):
            return _NO_RANDOMNESS  # every training step passes here: no generator-based context to build
        return self._seeded_randomness(generator, rank)

    @contextlib.contextmanager
    def _seeded_randomness(self, generator: torch.Generator, rank: int) -> Iterator[None]:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) + int(rank)
        # torch.manual_seed seeds every CUDA device too: fork them all, not only the one in use.
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def meta_gradient(
        self,
        batch: TaskBatch,
        iteration: int = 0,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        params: Mapping[str, Tensor] | None = None,
        meta: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """The functional entry point: gradients of the meta-loss with respect to the trainable parameters and
        the rule's learned tensors (``params``/``meta``, default the module's own), plus metrics; nothing is
        written. ``shard=(rank, world)`` computes them on that rank's share of the tasks (distributed
        training): any randomness is drawn for the whole batch first, and a shard's results are weighted by its
        share of the tasks (:func:`~metagrad.tasks.base.shard_weight`), so that their plain mean over the ranks
        matches one process, also when the tasks do not divide evenly."""
        named = self._named_parameters()
        with self._numerics(next(iter(named.values()))):
            return self._meta_step(batch, iteration, generator, shard, named, params, meta)

    def _meta_step(
        self,
        batch: TaskBatch,
        iteration: int,
        generator: torch.Generator | None,
        shard: tuple[int, int],
        named: dict[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        meta: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, Params, dict[str, Tensor]]:
        """:meth:`meta_gradient` given the network's parameters by name (``named``, looked up once per call:
        ``named_parameters`` walks every submodule, a cost the compiled step would otherwise pay several times)."""
        self._check_batch(batch, named)
        weights, first_order = self.schedule(iteration)
        scale = 1.0
        if shard[1] > 1:
            scale = shard_weight(len(batch), shard[1], shard[0])
            batch = batch.split(shard[1], shard[0])
        tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        params = _detach(named if params is None else params)
        learned, frozen = self._split_learned(params, named)
        args = (learned, frozen, _detach(self.meta_state if meta is None else meta), tasks, weights, first_order)
        with self._explain_transform_errors(lambda: self._meta_gradient(*args, eager=True)):
            with self._task_randomness(generator, batch.support_x.device, shard[0]):
                out = self._meta_gradient(*args)
        if scale == 1.0:
            return out
        return tuple({k: v * scale for k, v in tree.items()} for tree in out)  # type: ignore[return-value]

    def _split_learned(
        self, params: Params, named: Mapping[str, Tensor], excluded: frozenset[str] | None = None
    ) -> tuple[Params, Params]:
        """``params`` as the meta-learned ones (``named`` requires grad, not in :attr:`not_meta_learned`, or in
        ``excluded`` where the caller has it at hand) and the rest, which the meta-gradient holds fixed."""
        excluded = self.not_meta_learned if excluded is None else excluded
        learned = {k: v for k, v in params.items() if named[k].requires_grad and k not in excluded}
        return learned, {k: v for k, v in params.items() if k not in learned}

    @contextlib.contextmanager
    def _explain_transform_errors(self, rerun: Callable[[], Any]) -> Iterator[None]:
        """Turn torch.func's failure on a user's network into one ModelError naming the module and the fix."""
        try:
            yield
        except RuntimeError as e:
            explained = self._transform_error(e, rerun)
            if explained is None and not self.vmapped and plain_autograd():
                # The eager task loop failed in torch.autograd (e.g. "modified by an inplace operation"): torch.func,
                # which the explanations know, meets the same network in a rerun.
                try:
                    with transforms_only():
                        rerun()
                except RuntimeError as again:
                    explained = self._transform_error(again, rerun)
            if explained is None:
                raise
            raise explained from (e if isinstance(explained, CompileError) else None)  # (the backend's traceback)

    def _transform_error(self, error: RuntimeError, rerun: Callable[[], Any]) -> MetagradError | None:
        """The ModelError that explains torch.func's ``error`` (see :meth:`_explain_transform_errors`), the
        CompileError for a compiler backend's failure, or None where it is neither."""
        if _backend_failed(error):
            # Not the network: what the network does fails in Dynamo's tracing, before the backend. (The backend's
            # text may mention vmap or an in-place operation anywhere, as in a file path.)
            inner = getattr(error, "inner_exception", None) or error
            first = (str(inner).strip().splitlines() or [""])[0][:300]
            return CompileError(
                f"torch.compile's backend {getattr(error, 'backend_name', '?')!r} could not compile "
                f"{type(self).__name__}'s meta-step ({type(inner).__name__}: {first}): check the options given to "
                "compile(), or run uncompiled (train.compile = false)"
            )
        text = str(error)
        advice = next((v for k, v in _TRANSFORM_FAILURES.items() if k in text), None)
        if advice is None:
            return None
        where = self._failing_module(rerun)
        first = text.strip().splitlines()[0][:300]
        return ModelError(f"{where} cannot run under metagrad's torch.func transforms: {advice} (torch: {first})")

    def _failing_module(self, rerun: Callable[[], Any]) -> str:
        """Re-run the failing call eagerly with hooks that record the innermost module still running."""
        stack: list[str] = []
        handles = []
        for name, module in self.model.named_modules():
            label = f"{name or 'model'} ({type(module).__name__})"
            handles.append(module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label)))
            handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
        try:
            with transforms_only():  # (the failure as torch.func meets it, also where the task loop used autograd)
                rerun()
        except Exception:  # noqa: BLE001 - the failure is the point; only the stack matters here
            pass
        finally:
            for h in handles:
                h.remove()
        return f"module {stack[-1]}" if stack else f"model {type(self.model).__name__}"

    def backward(
        self,
        batch: TaskBatch,
        iteration: int | None = None,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        """Accumulate the meta-gradient of ``batch`` into ``.grad`` of the learner's parameters and return the
        metrics (``loss``, ``pre_loss``, ...), so that ``opt.zero_grad(); learner.backward(batch); opt.step()``
        trains with any ``torch.optim`` optimizer, scheduler and ``clip_grad_norm_``.

        Frozen parameters get no ``.grad``. Reptile's "gradient" is its weight move ``θ − mean φ``. In training
        mode the batch norms' running statistics are then updated from the same batch, outside the transforms.
        ``iteration`` drives the algorithm's schedule (multi-step loss, first-order iterations); by default the
        learner counts its own ``backward`` calls."""
        it = self.iteration if iteration is None else int(iteration)
        named = self._named_parameters()
        with self._numerics(next(iter(named.values()))):
            if type(self).meta_gradient is MetaLearner.meta_gradient:
                gp, gm, metrics = self._meta_step(batch, it, generator, shard, named)
            else:  # a subclass that overrides the public entry point (``_meta_step`` is the cheaper override point)
                gp, gm, metrics = self.meta_gradient(batch, it, generator, shard)
        for tree, grads in ((named, gp), (self._learned_tensors() if gm else {}, gm)):
            for k, g in grads.items():
                p = tree[k]
                if not p.requires_grad:
                    continue
                if p.grad is None:  # the meta-step's outputs are fresh tensors: no copy needed, unless...
                    # Both contiguous (same shape): the same memory order (strides may differ only in size-1 dims).
                    contiguous = g.is_contiguous() and p.is_contiguous()
                    if g.dtype is not p.dtype or (not contiguous and g.stride() != p.stride()):
                        # ...the layout differs (channels-last convolutions return channels-last weight gradients):
                        # PyTorch's contract is a .grad strided like its parameter, and fused optimizers rely on it.
                        g = torch.empty_like(p).copy_(g)
                    p.grad = g
                else:
                    p.grad.add_(g)
        if self.training and self.tracks_statistics:
            self.track_statistics(batch)
        if iteration is None:
            self.iteration += 1
        if any(v.requires_grad for v in metrics.values()):
            metrics = {k: v.detach() for k, v in metrics.items()}
        return metrics

    # ----- input checks --------------------------------------------------------------------------------
    def check_batch(self, batch: TaskBatch) -> None:
        """Raise a DataError if ``batch`` does not fit this learner (its dtype, labels or target shapes)."""
        self._check_batch(batch, self._named_parameters())

    def _check_batch(self, batch: TaskBatch, named: Mapping[str, Tensor]) -> None:
        self._check_inputs(batch, next(iter(named.values())))
        if self.loss_name != "cross_entropy" and self.loss_fn is not F.mse_loss:
            return  # a user's loss: its own contract
        self._check_targets(batch)

    def _check_inputs(self, batch: TaskBatch, ref: Tensor | None = None) -> None:
        """A TaskBatch whose inputs have the learner's dtype (``ref``: a parameter of the network)."""
        if not isinstance(batch, TaskBatch):
            raise DataError(f"expected a TaskBatch, got {type(batch).__name__}")
        if ref is None:
            ref = next(self.model.parameters())
        for field in ("support_x", "query_x"):
            x = getattr(batch, field)
            if x.is_floating_point() and x.dtype != ref.dtype:
                raise DataError(
                    f"TaskBatch.{field} is {x.dtype} but the learner is {ref.dtype}: use batch.to(device, {ref.dtype})"
                )
        self._x_ndim = batch.support_x.dim() - 1

    def _output_shape(self, batch: TaskBatch) -> tuple[int, ...]:
        """The network's output shape on one task's support inputs: one plain forward pass per input shape."""
        key = (tuple(batch.support_x.shape[1:]), batch.support_x.dtype, batch.support_x.device)
        if key not in self._output_shapes:
            with torch.no_grad(), self._random_layers(False):
                self._output_shapes[key] = tuple(self.network(_detach(self.params), batch.support_x[0]).shape)
        return self._output_shapes[key]

    def _check_targets(self, batch: TaskBatch) -> None:
        """Labels that index the model's outputs, or regression targets of the outputs' shape."""
        out_shape = self._output_shape(batch)
        fields = [(field, getattr(batch, field)) for field in ("support_y", "query_y")]
        if self.loss_name != "cross_entropy":
            for field, y in fields:
                if tuple(y.shape[2:]) != out_shape[1:]:
                    raise DataError(
                        f"TaskBatch.{field} has per-point shape {tuple(y.shape[2:])} but the model predicts "
                        f"{out_shape[1:]}: targets must have the prediction's shape (e.g. [B, K, 1], not [B, K])"
                    )
            return
        for field, y in fields:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise DataError(f"TaskBatch.{field} must hold integer class labels, got {y.dtype}")
        fields = [(field, y) for field, y in fields if y.numel()]
        if not fields:
            return
        # Every field's range in one read from the device (on a GPU each read waits for it, at every step).
        bounds = torch.stack([b.to(torch.int64) for _, y in fields for b in torch.aminmax(y)]).tolist()
        for (field, _), low, high in zip(fields, bounds[::2], bounds[1::2], strict=True):
            if low < 0 or high >= out_shape[-1]:
                raise DataError(
                    f"TaskBatch.{field} holds labels in [{low}, {high}] but the model has {out_shape[-1]} "
                    f"outputs: labels must be in [0, {out_shape[-1]})"
                )

    def _check_task(self, support_x: Tensor, support_y: Tensor) -> None:
        if isinstance(support_x, TaskBatch):
            raise DataError("adapt() takes one task's support_x and support_y, not a TaskBatch")
        if self._x_ndim is not None and support_x.dim() != self._x_ndim:
            raise DataError(
                f"adapt() takes one task ([K, ...], {self._x_ndim} dimensions); got support_x of shape "
                f"{tuple(support_x.shape)}: a batch of tasks? adapt them one at a time"
            )
        if support_x.shape[0] != support_y.shape[0] or support_x.shape[0] == 0:
            raise DataError(
                f"adapt() needs K >= 1 support points with one target each; got support_x {tuple(support_x.shape)} "
                f"and support_y {tuple(support_y.shape)}"
            )

    # ----- adaptation and evaluation ----------------------------------------------------------------
    @contextlib.contextmanager
    def _random_layers(self, enabled: bool) -> Iterator[None]:
        """Dropout and other random layers on or off (``train``/``eval`` of the network) within the block; batch
        norms are unaffected (the learner picks their statistics per call)."""
        was = self.model.training
        self.model.train(enabled and was)
        try:
            yield
        finally:
            self.model.train(was)

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int | None = None,
        params: Params | None = None,
        dropout: bool = False,
    ) -> Params:
        """Adapt to one task's support points ([K, ...]) with the learned inner rule; returns new weights.
        Random layers are off unless ``dropout``."""
        steps = self.inner_steps if steps is None else int(steps)
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        self._check_task(support_x, support_y)
        p = _detach(self.params if params is None else params)
        with self._random_layers(dropout), self._numerics(support_x):
            return self.descend(p, _detach(self.meta_state), support_x, support_y, steps)

    @torch.no_grad()
    def predict(
        self, x: Tensor, params: Params | None = None, step: int | None = None, dropout: bool = False
    ) -> Tensor:
        """The network's output on ``x`` with ``params`` (default: the meta-learned initialisation).

        ``step`` matters only for per-step batch norm: the number of inner steps that produced ``params``
        (default 0 for the initialisation, ``inner_steps`` for adapted weights, as :meth:`adapt` takes); ``x`` is
        normalised as a query batch (``query_statistics``)."""
        if step is None:
            step = 0 if params is None else self.inner_steps
        with self._random_layers(dropout), self._numerics(x):
            return self.network(_detach(self.params if params is None else params), x, step, self.query_mode())

    def _curve(self, params: Params, meta: Params, steps: int, task: Task) -> Tensor:
        sx, sy, qx, qy = task
        values = [self.metric(params, qx, qy)]
        anchor = self.inner_anchor(params)
        state = None
        for s in range(steps):
            params, state = self.inner_step(params, meta, sx, sy, s, self.eval_rule, True, state, anchor)
            params, state = _detach(params), _detach(state)
            values.append(self.metric(params, qx, qy, s + 1))
        return torch.stack(values).detach()

    def adaptation_curve(self, batch: TaskBatch, steps: int, chunk: int | None = None) -> Tensor:
        """The metric (query MSE, or accuracy) of every task after 0..steps inner steps: [B, steps + 1] (an
        algorithm without an inner loop, ProtoNets, gives one column from its ``_curve``)."""
        self.check_batch(batch)
        if chunk is None:  # bound the activations of one vmapped chunk (images are far larger than points)
            per_task = batch.support_x[0].numel() + batch.query_x[0].numel()
            chunk = max(1, min(200, 400_000 // per_task))
        out = []
        with self._random_layers(False), self._numerics(batch.support_x):
            for start in range(0, len(batch), chunk):
                b = batch[start : start + chunk]
                tasks = (b.support_x, b.support_y, b.query_x, b.query_y)
                shared = (_detach(self.params), _detach(self.meta_state), steps)
                out.append(self.map_tasks(self._curve, shared, tasks))
        return torch.cat(out)

    @property
    def tracks_statistics(self) -> bool:
        """Whether the network has batch-norm running statistics that training updates (found once: a module's
        layers do not change under a learner)."""
        found = self.__dict__.get("_tracks_statistics")
        if found is None:
            found = (self.per_step and any(True for _ in self.model.buffers())) or _has_running_statistics(self.model)
            self.__dict__["_tracks_statistics"] = found
        return found

    @torch.no_grad()
    def track_statistics(self, batch: TaskBatch, tasks: int = 4) -> None:
        """Fold the batch statistics of the first ``tasks`` tasks into the model's running statistics.

        :meth:`backward` calls it in training mode. Each task is adapted as in training; step ``s`` sees the
        support set under the weights after ``s`` steps, and the last step the query set, which is what (per-step)
        batch norm normalises in training. Plain forward passes outside every transform, with random layers off,
        so the running statistics are ordinary in-place buffer updates (identical on every rank)."""
        if not self.tracks_statistics:
            return
        meta = _detach(self.meta_state)
        with self._random_layers(False), self._numerics(batch.support_x):
            for i in range(min(int(tasks), len(batch))):
                sx, sy, qx = batch.support_x[i], batch.support_y[i], batch.query_x[i]
                p, state = _detach(self.params), None
                anchor = self.inner_anchor(p)  # the inner problem training solves (iMAML's proximal term)
                for s in range(self.inner_steps):
                    self.network(p, sx, s, track=True)
                    p, state = self.inner_step(p, meta, sx, sy, s, self.rule, True, state, anchor)
                    p, state = _detach(p), _detach(state)
                self.network(p, qx, self.inner_steps, track=True)
