"""CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, "Fast Context Adaptation via Meta-Learning", ICML 2019).

The network gets a small context vector ``c``: reset to zero for every task, it is the *only* thing the inner loop
adapts (``c ← c − α ∇c L_support``); the network's weights are meta-learned in the outer loop through the
adapted context (second order unless ``first_order``), as in MAML. The context enters the network in one of two
ways (:class:`ContextNetwork`):

* ``"concat"`` (the paper's regression networks): concatenated to the input of the first linear layer. Written as
  ``W [x; c] + b = W_x x + b + W_c c``, so any MLP takes it unchanged: ``W_c`` is a new meta-learned matrix.
* ``"film"`` (the paper's image networks, section 5.3): FiLM on a hidden layer's output,
  ``h ← (1 + γ) ⊙ h + β`` per channel with ``(γ, β) = Linear(c)``; by default after the third block's batch norm
  of Conv-4. The scale is parameterised as ``1 + γ`` and the FiLM layer's bias starts at zero, so a zero context
  leaves the backbone as it is at initialisation.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.algorithms.base import Params, Task
from metagrad.algorithms.maml import MAML
from metagrad.errors import ConfigError
from metagrad.inner.sgd import SGD
from metagrad.registry import register_algorithm
from metagrad.tasks.base import TaskBatch

__all__ = ["CAVIA", "CAVIAConfig", "ContextNetwork", "CONTEXT", "CONDITIONINGS"]

CONTEXT = "context"  # the context's name among the wrapped network's parameters
CONDITIONINGS = ("auto", "concat", "film")


def _is_context(name: str, parameter: Tensor) -> bool:
    return name == CONTEXT


class ContextNetwork(nn.Module):
    """``net`` with a context vector ``context`` (a parameter, held at zero) fed in by ``conditioning``.

    ``layer`` names the submodule of ``net`` whose output the context modulates: default the first
    ``nn.Linear`` for ``"concat"``; ``"film"`` needs it (e.g. ``"norms.2"`` of Conv-4). A forward hook on that
    layer feeds the context in. It is registered once, here: a hook registered for each pass stopped
    ``torch.compile`` at every pass (Dynamo cannot trace the registration inside ``vmap`` or ``grad``), so the
    compiled meta-step ran in pieces, slower than eagerly. While wrapped, ``net``'s own forward passes are
    therefore conditioned on ``context`` too (a zero context: nothing for ``"concat"``, FiLM's bias for
    ``"film"``); :meth:`unwrap` gives the plain network back. One layer feeds one ContextNetwork in use; the hook
    holds it weakly, so a wrapper that is no longer referenced (a failed or discarded wrap) lets another wrap the
    network, and a copy of the network alone (``copy.deepcopy(wrapper.net)``, ``torch.save``) is the plain one."""

    def __init__(self, net: nn.Module, context: int, conditioning: str = "concat", layer: str | None = None) -> None:
        super().__init__()
        if int(context) <= 0:
            raise ConfigError(f"algorithm.context must be positive, got {context}")
        if conditioning not in ("concat", "film"):
            raise ConfigError(f"conditioning must be 'concat' or 'film', got {conditioning!r}")
        self.net = net
        self.conditioning = conditioning
        if layer is None:
            if conditioning == "film":
                raise ConfigError("FiLM conditioning needs the hidden layer to modulate (algorithm.film_layer)")
            layer = next((n for n, m in net.named_modules() if isinstance(m, nn.Linear)), None)
            if layer is None:
                raise ConfigError(f"{type(net).__name__} has no nn.Linear to concatenate the context to: use film")
        try:
            target = net.get_submodule(layer)
        except AttributeError:
            names = ", ".join(n for n, _ in net.named_modules() if n)
            raise ConfigError(f"the model has no layer {layer!r} for the context; its layers: {names}") from None
        self.layer = layer
        dtype = next(net.parameters()).dtype
        self.context = nn.Parameter(torch.zeros(int(context), dtype=dtype))
        if conditioning == "concat":
            if not isinstance(target, nn.Linear):
                raise ConfigError(f"concat conditioning needs an nn.Linear layer, {layer!r} is {type(target).__name__}")
            # Initialised as nn.Linear initialises the widened layer's columns: U(±1/√fan_in), fan_in = in + context.
            bound = 1 / math.sqrt(target.in_features + int(context))
            ref = target.weight
            w = torch.empty(target.out_features, int(context), dtype=ref.dtype, device=ref.device)
            self.context_weight = nn.Parameter(w.uniform_(-bound, bound))
        else:
            channels = self._channels(target)
            ref = next(target.parameters(), self.context)
            self.film = nn.Linear(int(context), 2 * channels, dtype=ref.dtype, device=ref.device)
            nn.init.zeros_(self.film.bias)
        # What the learner reads from its model: per-step batch norm and the parameters adapted in the outer loop only.
        self.per_step = bool(getattr(net, "per_step", False))
        self.meta_only = tuple("net." + p for p in getattr(net, "meta_only", ()))
        if any(h.owner is not None for h in _context_feeds(target).values()):
            raise ConfigError(f"the model's layer {layer!r} already feeds a ContextNetwork still in use: wrap a "
                              "network of its own, or give that one back first with its unwrap()")  # fmt: skip
        _remove_feeds(target)  # those of wrappers no longer in use
        self._passes_fed = 0  # eager passes through the layer: a layer the forward pass never calls is refused
        self._context_feed = _ContextFeed(self)
        target.register_forward_hook(self._context_feed)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_context_feed" not in self.__dict__:  # pickled before the wrapper kept its feed: the layer's hook is it
            layer = self.net.get_submodule(self.layer)
            feed = next((h for h in _context_feeds(layer).values() if h.owner is self), None)
            if feed is not None:
                self.__dict__["_context_feed"] = feed

    def unwrap(self) -> nn.Module:
        """``net`` without this wrapper's hook, as it was before it was wrapped (this wrapper no longer runs)."""
        _remove_feeds(self.net.get_submodule(self.layer), self)
        return self.net

    @staticmethod
    def _channels(module: nn.Module) -> int:
        for attr in ("out_channels", "num_features", "out_features"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            return int(weight.shape[-1])
        raise ConfigError(f"cannot tell how many channels {type(module).__name__} outputs for FiLM: choose a conv, "
                          "norm or linear layer")  # fmt: skip

    def _feed(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # (no state changes in a compiled graph)
            self._passes_fed += 1
        if self.conditioning == "concat":
            return output + F.linear(self.context, self.context_weight)
        gamma, beta = self.film(self.context).chunk(2)
        shape = (-1,) + (1,) * (output.dim() - 2)  # channels on dim 1: [N, C, H, W] or [N, C]
        return output * (1 + gamma).reshape(shape) + beta.reshape(shape)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.compiler.is_compiling():  # checked on the eager passes (CAVIA makes one before it compiles)
            return self.net(x, *args, **kwargs)
        before = self._passes_fed
        # The feed reads this very module's context: on a task thread (metagrad.task_threads) a shell of the
        # wrapper, whose tensors are the task's, where the hook itself only knows the wrapper it was made for.
        feed = self.__dict__.get("_context_feed")  # (pickled before it was kept: the hook's owner is this one)
        calling = _CALLING.__dict__.setdefault("owners", {})
        outer = calling.get(feed)
        calling[feed] = self
        try:
            out = self.net(x, *args, **kwargs)
        finally:
            if outer is None:
                del calling[feed]
            else:
                calling[feed] = outer
        if self._passes_fed == before:  # the network never called that module: the context would silently do nothing
            feeds = _context_feeds(self.net.get_submodule(self.layer)).values()
            if not any(h is feed if feed is not None else h.owner is self for h in feeds):
                raise ConfigError("this ContextNetwork was unwrapped (unwrap()): wrap the network again")
            raise ConfigError(
                f"CAVIA's context layer {self.layer!r} is never called by {type(self.net).__name__}'s forward pass "
                "(it uses the layer's weights directly?): choose a layer the forward pass calls"
            )
        return out


# The ContextNetwork each feed serves in the forward pass under way on this thread, by feed: the wrapper itself, or
# on a task thread its shell (same attributes, the task's tensors).
_CALLING = threading.local()


class _ContextFeed:
    """The forward hook by which a :class:`ContextNetwork` feeds its context in. It holds the wrapper weakly (see
    ContextNetwork); pickled or deep-copied with it, it follows the copy of the wrapper. It feeds the context of
    the wrapper whose forward pass is under way on the calling thread (a task thread's shell of it, see
    :mod:`metagrad.task_threads`), so tasks of a CAVIA learner may run side by side on threads."""

    thread_safe_tasks = True  # (metagrad.task_threads.why_not_threaded: this hook reaches no shared state)

    def __init__(self, owner: ContextNetwork | None) -> None:
        self._owner = weakref.ref(owner) if owner is not None else None

    @property
    def owner(self) -> ContextNetwork | None:
        return self._owner() if self._owner is not None else None

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        owner = None if torch.compiler.is_compiling() else getattr(_CALLING, "owners", {}).get(self)
        owner = owner or self.owner  # (compiled: one task at a time, on the wrapper itself)
        return None if owner is None else owner._feed(module, inputs, output)

    def __reduce__(self) -> tuple[Any, ...]:
        return _ContextFeed, (self.owner,)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ContextFeed:
        # The network copied alone: its wrapper's copy is referenced by nothing else and goes, and so does the feed.
        owner = self.owner
        return _ContextFeed(copy.deepcopy(owner, memo) if owner is not None else None)


def _context_feeds(layer: nn.Module) -> dict[int, _ContextFeed]:
    return {k: h for k, h in layer._forward_hooks.items() if isinstance(h, _ContextFeed)}


def _remove_feeds(layer: nn.Module, owner: ContextNetwork | None = None) -> None:
    """Remove ``owner``'s feed from ``layer`` (default: the feeds of wrappers no longer in use)."""
    for key, hook in _context_feeds(layer).items():
        if hook.owner is owner:
            for hooks in (layer._forward_hooks, layer._forward_hooks_with_kwargs, layer._forward_hooks_always_called):
                hooks.pop(key, None)


@dataclass
class CAVIAConfig:
    """``[algorithm]`` options of CAVIA (``name = "cavia"``). ``conditioning``: ``"auto"`` concatenates the context
    to the input for vector inputs and uses FiLM on ``film_layer`` for images."""

    inner_lr: float = 1.0
    inner_steps: int = 1
    context: int = 5
    conditioning: str = "auto"
    film_layer: str = "norms.2"
    first_order: bool = False

    def validate(self, cfg: Any) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"algorithm.conditioning must be one of {', '.join(CONDITIONINGS)}, got "
                              f"{self.conditioning!r}")  # fmt: skip
        if self.context <= 0:
            raise ConfigError(f"algorithm.context must be positive, got {self.context}")
        if self.inner_steps == 0:
            raise ConfigError("algorithm.inner_steps must be positive for cavia (the context is all it adapts)")


@register_algorithm("cavia", config=CAVIAConfig)
class CAVIA(MAML):
    """``CAVIA(ContextNetwork(net, 5))``: MAML's outer loop, an inner loop on the context only."""

    name = "cavia"
    # The context is not meta-learned (it is reset to zero per task): no gradient, so no optimizer moves it.
    not_meta_learned = frozenset({CONTEXT})

    def __init__(
        self,
        model: ContextNetwork,
        rule: Any = None,
        *,
        inner_lr: float = 1.0,
        inner_steps: int = 1,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, ContextNetwork):
            raise ConfigError("CAVIA adapts a context vector: wrap the network, CAVIA(ContextNetwork(net, context=5))")
        if kwargs.pop("adapt_only", None) is not None:
            raise ConfigError("CAVIA adapts the context and nothing else: adapt_only does not apply")
        super().__init__(
            model,
            rule if rule is not None else SGD(inner_lr),
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=first_order,
            adapt_only=_is_context,  # by exact name: a prefix would also match context_weight
            **kwargs,
        )
        self.name = "cavia"

    @classmethod
    def from_config(cls, options: CAVIAConfig, model: nn.Module, spec: Any) -> CAVIA:
        o = options
        conditioning = o.conditioning
        if conditioning == "auto":
            conditioning = "concat" if len(spec.input_shape) == 1 else "film"
        layer = o.film_layer if conditioning == "film" else None
        return cls(
            ContextNetwork(model, o.context, conditioning, layer),
            inner_lr=o.inner_lr,
            inner_steps=o.inner_steps,
            first_order=o.first_order,
            **cls.spec_options(spec),
        )

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # Every task starts from a zero context, whatever the module holds.
        params = {**params, CONTEXT: torch.zeros_like(params[CONTEXT])}
        return super().task_loss(params, meta, task, weights, first_order)

    def _check_batch(self, batch: TaskBatch, named: Mapping[str, Tensor]) -> None:
        super()._check_batch(batch, named)
        # The plain forward pass per input shape also with a loss of the user's (which skips the targets' check):
        # ContextNetwork checks there, eagerly, that the network calls the context's layer.
        self._output_shape(batch)

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int | None = None,
        params: Params | None = None,
        dropout: bool = False,
    ) -> Params:
        """The weights with this task's adapted context (from zero); the network's weights are unchanged."""
        p = dict(self.params if params is None else params)
        p[CONTEXT] = torch.zeros_like(p[CONTEXT]).detach()
        return super().adapt(support_x, support_y, steps, p, dropout)
