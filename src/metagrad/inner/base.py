"""The inner-loop update-rule interface: a transform of the per-tensor gradient.

An inner step is ``θ ← θ − rule.update(g, step, meta)``. Rules that learn something (per-step rates,
per-element rates, curvature factors) declare their tensors in ``init``. A rule is an ``nn.Module``: the learner
binds it to the network's adapted parameters, and those tensors become the rule's ``nn.Parameter`` objects
(``learner.rule.parameters()``, named ``rule.learned.*`` in ``state_dict()``), trained by the outer optimizer,
moved by ``.to()`` and checkpointed with the weights; the functional core reads them as ``meta``. Rules
compose with :class:`Chain`, applied left to right: ``Chain(Curvature(), LSLR(0.01, 5))`` computes
``α(step, tensor) · MC(g)``.

Rules may also carry state across the inner steps of one adaptation (optax-style): ``init_state(params)`` gives
the state a task's adaptation starts from (e.g. Adam's moment estimates) and ``update_with_state(grads, state,
meta, step)`` returns ``(updates, state)``. A stateless rule writes ``update`` only; the learner always calls
``update_with_state``. State is per task (vmapped with it), never learned; Reptile can carry it over between
meta-iterations.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from metagrad.named import NamedTensors

__all__ = ["InnerRule", "Chain", "Params"]

Params = dict[str, Tensor]


class InnerRule(nn.Module):
    """Base class: override ``update`` and, for learned rules, ``init``."""

    thread_safe_tasks: bool | None = None
    """Whether ``update`` may run for several tasks at once on different threads (see
    ``MetaLearner.thread_safe_tasks``): ``None`` decides by where the class is defined (metagrad's rules: yes)."""

    def init(self, params: Mapping[str, Tensor]) -> Params:
        """Learned tensors this rule adds to ``meta_state`` (none by default)."""
        return {}

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        """Transform the inner gradient of step ``step`` (0-based)."""
        raise NotImplementedError

    def init_state(self, params: Mapping[str, Tensor]) -> Params:
        """The state an adaptation starts from (none by default); keys must not clash with other rules'."""
        return {}

    def update_with_state(
        self, grads: Mapping[str, Tensor], state: Mapping[str, Tensor], meta: Mapping[str, Tensor], step: int
    ) -> tuple[Params, Params]:
        """``(updates, new state)`` for the inner gradient of step ``step``; stateless rules need not override it."""
        return self.update(grads, step, meta), dict(state)

    def bind(self, params: Mapping[str, Tensor]) -> None:
        """Create this rule's learned tensors for ``params`` (the adapted ones) as its ``nn.Parameter`` objects."""
        self.learned = NamedTensors(self.init(params), learned=True)

    def extra_repr(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "training"}
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())


class Chain(InnerRule):
    """Apply several rules in order; their learned tensors are merged into one ``meta_state``."""

    def __init__(self, *rules: InnerRule) -> None:
        super().__init__()
        if not rules:
            raise ValueError("Chain needs at least one rule")
        self.rules = nn.ModuleList(rules)

    def init(self, params: Mapping[str, Tensor]) -> Params:
        out: Params = {}
        for rule in self.rules:
            new = rule.init(params)
            clash = set(out) & set(new)
            if clash:
                raise ValueError(f"two rules in the chain declare the same meta-state keys: {sorted(clash)}")
            out.update(new)
        return out

    def init_state(self, params: Mapping[str, Tensor]) -> Params:
        out: Params = {}
        for rule in self.rules:
            out.update(rule.init_state(params))
        return out

    def update(self, grads: Mapping[str, Tensor], step: int, meta: Mapping[str, Tensor]) -> Params:
        out = dict(grads)
        for rule in self.rules:
            out = rule.update(out, step, meta)
        return out

    def update_with_state(
        self, grads: Mapping[str, Tensor], state: Mapping[str, Tensor], meta: Mapping[str, Tensor], step: int
    ) -> tuple[Params, Params]:
        out, state = dict(grads), dict(state)
        for rule in self.rules:
            out, state = rule.update_with_state(out, state, meta, step)
        return out, state
