"""iMAML (Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019).

The inner problem is proximal: ``φ = argmin L_support(φ) + λ/2 ‖φ − θ‖²``, solved approximately by
``inner_steps`` steps of the inner rule from ``θ`` (evaluation adapts the same way). At its solution
``dφ/dθ = (I + H/λ)⁻¹`` with ``H = ∇²L_support(φ)``, so the meta-gradient of one task is
``(I + H/λ)⁻¹ ∇φ L_query(φ)``, computed by ``cg_steps`` of conjugate gradient on Hessian-vector products (the
paper's Algorithm 2), on the system ``((1 + cg_damping) I + H/λ) v = ∇φ L_query`` (damping as in the authors'
code; 0 solves the exact system). Nothing of the inner loop is differentiated through, so memory does not grow
with ``inner_steps``.

Trainable parameters that the inner loop does not adapt (``adapt_only``) get the full implicit derivative
``∂L_query/∂w − (1/λ) ∂/∂w ⟨∇φ L_support(φ, w), v⟩``. The inner rule's learned tensors get no gradient (the
solution of the inner problem does not depend on how it was reached), so the rule must be a fixed one.

``vectorize=k`` solves and differentiates ``k`` tasks at a time, as for the other algorithms, and ``compile()``
(``train.compile``) compiles the whole implicit meta-gradient, inner solve, line search and CG included, as one
graph: everything is branch-free. On the sinusoid preset's step, Inductor's code ran 14× the eager rate after a
cold compile of about 70 s (``docs/results.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value

from metagrad.algorithms.base import MetaLearner, Params, Task, _detach
from metagrad.errors import ConfigError
from metagrad.inner.adam import Adam
from metagrad.inner.base import InnerRule
from metagrad.inner.sgd import SGD
from metagrad.registry import register_algorithm
from metagrad.transforms import inner_pass

__all__ = ["IMAML", "IMAMLConfig", "conjugate_gradient", "INNER_OPTIMIZERS"]

INNER_OPTIMIZERS = ("sgd", "adam")


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """``steps`` iterations of conjugate gradient for ``A x = b`` from ``x = 0`` (A symmetric positive definite,
    given by ``matvec``), on dicts of tensors. No data-dependent branch, so it runs under ``vmap``: a step whose
    residual is already zero leaves ``x`` as it is."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap != 0, rs / torch.where(pap != 0, pap, 1), 0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        beta = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, 1), 0)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    return x


@dataclass
class IMAMLConfig:
    """``[algorithm]`` options of iMAML (``name = "imaml"``): the proximal strength ``lam`` (λ), the CG solve."""

    inner_lr: float = 0.01
    inner_steps: int = 5
    lam: float = 1.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    inner_optimizer: str = "sgd"
    line_search: int = 0

    def validate(self, cfg: Any) -> None:
        if not self.lam > 0:
            raise ConfigError(f"algorithm.lam must be > 0 (the proximal term's strength λ), got {self.lam}")
        if self.cg_steps <= 0:
            raise ConfigError(f"algorithm.cg_steps must be positive, got {self.cg_steps}")
        if not self.cg_damping >= 0:
            raise ConfigError(f"algorithm.cg_damping must be >= 0, got {self.cg_damping}")
        if self.line_search < 0:
            raise ConfigError(f"algorithm.line_search must be >= 0 (halvings of the inner step), got "
                              f"{self.line_search}")  # fmt: skip
        if self.inner_steps == 0:
            raise ConfigError("algorithm.inner_steps must be positive for imaml (it solves an inner problem)")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"algorithm.inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got "
                              f"{self.inner_optimizer!r}")  # fmt: skip


@register_algorithm("imaml", config=IMAMLConfig)
class IMAML(MetaLearner):
    """``IMAML(model, lam=1.0, inner_steps=5, cg_steps=5)``: implicit meta-gradients with any fixed inner rule."""

    name = "imaml"

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule | None = None,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        lam: float = 1.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        line_search: int = 0,
        **kwargs: Any,
    ) -> None:
        if not lam > 0:
            raise ConfigError(f"lam must be > 0, got {lam}")
        if int(cg_steps) <= 0 or not cg_damping >= 0:
            raise ConfigError(f"cg_steps must be positive and cg_damping >= 0, got {cg_steps} and {cg_damping}")
        if getattr(model, "per_step", False):
            raise ConfigError(
                "model.bn = 'per_step' indexes batch norm by the inner step, which changes iMAML's inner problem "
                "from step to step: use model.bn = 'transductive'"
            )
        super().__init__(model, rule if rule is not None else SGD(inner_lr), inner_steps=inner_steps, **kwargs)
        if self.meta_state:
            raise ConfigError("iMAML's implicit gradient does not reach an inner rule's learned tensors: use a fixed "
                              "rule (SGD, Adam)")  # fmt: skip
        if int(line_search) < 0:
            raise ConfigError(f"line_search must be >= 0 (halvings of the inner step; 0: none), got {line_search}")
        self.lam, self.cg_steps, self.cg_damping = float(lam), int(cg_steps), float(cg_damping)
        self.line_search = int(line_search)

    @classmethod
    def from_config(cls, options: IMAMLConfig, model: nn.Module, spec: Any) -> IMAML:
        o = options
        rule = Adam(o.inner_lr) if o.inner_optimizer == "adam" else SGD(o.inner_lr)
        return cls(model, rule, inner_lr=o.inner_lr, inner_steps=o.inner_steps, lam=o.lam, cg_steps=o.cg_steps,
                   cg_damping=o.cg_damping, line_search=o.line_search, **cls.spec_options(spec))  # fmt: skip

    # ----- the proximal inner problem ----------------------------------------------------------------
    def inner_objective(
        self, params: Params, adapted: Params, x: Tensor, y: Tensor, step: int, anchor: Params | None = None
    ) -> Tensor:
        """``L_support(φ) + λ/2 ‖φ − anchor‖²`` (plain ``L_support`` without an anchor)."""
        loss = super().inner_objective(params, adapted, x, y, step)
        if anchor is None:
            return loss
        return loss + 0.5 * self.lam * sum(((adapted[k] - anchor[k]) ** 2).sum() for k in adapted)

    def inner_anchor(self, params: Params) -> Params:
        """The proximal term's centre: the weights the adaptation starts at (θ), fixed."""
        return _detach({k: params[k] for k in self.fast})

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
        """The rule's step, shortened by backtracking when ``line_search > 0``: the longest of ``u, u/2, …,
        u/2^line_search`` that decreases the proximal objective by Armijo's condition ``f(φ − t·u) ≤ f(φ) −
        10⁻⁴ t ⟨∇f, u⟩``, or no move if none does. The implicit gradient holds at the inner problem's solution,
        and a fixed step that overshoots on a sharply curved task never reaches it (meta-training then drifts to
        ever sharper initialisations, which the implicit gradient cannot see, and diverges). Branch-free, so it
        runs under ``vmap``: every candidate's loss is computed (forward passes only). With dropout active each
        candidate draws its own mask, so the test is noisy there; an update that does not descend (possible with
        Adam) is accepted only where it lowers the objective."""
        if self.line_search == 0:
            return super().inner_step(params, meta, x, y, step, rule, first_order, state, anchor)
        fast = self.fast
        if state is None:
            state = rule.init_state({k: params[k] for k in fast})

        def objective(adapted: Params) -> Tensor:
            return self.inner_objective(params, adapted, x, y, step, anchor)

        adapted = {k: params[k] for k in fast}
        g, f0 = grad_and_value(objective)(adapted)
        old = state
        update, state = rule.update_with_state(_detach(g), state, meta, step)
        slope = _dot(g, update)
        ts = [2.0**-j for j in range(self.line_search + 1)]
        accepted = [
            (objective({k: adapted[k] - t * update[k] for k in fast}) <= f0 - 1e-4 * t * slope).to(f0.dtype) * t
            for t in ts
        ]
        t = torch.stack(accepted).amax(0)  # the longest accepted step (0: none was)
        if state:  # a stateful rule (Adam) keeps its old state where no step was taken
            state = {k: torch.where(t > 0, v, old[k]) for k, v in state.items()}
        return {**params, **{k: adapted[k] - t * update[k] for k in fast}}, state

    def solve_inner(self, params: Params, meta: Params, x: Tensor, y: Tensor) -> Params:
        """``φ ≈ argmin L_support + λ/2 ‖φ − θ‖²`` from ``θ = params`` with the training rule (nothing is
        differentiated through the steps)."""
        return self.descend(_detach(params), meta, x, y, self.inner_steps, self.rule)

    # ----- the implicit meta-gradient ----------------------------------------------------------------------
    def _task_gradient(
        self, params: Params, meta: Params, learned: frozenset[str], task: Task
    ) -> tuple[Params, dict[str, Tensor]]:
        """One task's implicit meta-gradient for the ``learned`` parameters, and its pre/post query losses."""
        sx, sy, qx, qy = task
        fast = self.fast
        pre = self.loss(params, qx, qy)
        phi = self.solve_inner(params, meta, sx, sy)
        slow = [k for k in params if k not in fast and k in learned]
        rest = {k: v for k, v in phi.items() if k not in fast and k not in slow}

        def query(f: Params, w: Params) -> Tensor:
            return self.loss({**rest, **w, **f}, qx, qy, self.inner_steps)

        def support_grad(f: Params, w: Params) -> Params:
            with inner_pass():  # a support pass differentiated again, as an inner step's
                return grad(lambda f_: self.loss({**rest, **w, **f_}, sx, sy))(f)

        f0, w0 = {k: phi[k] for k in fast}, {k: phi[k] for k in slow}
        (g_fast, g_slow), post = grad_and_value(query, argnums=(0, 1))(f0, w0)

        def matvec(v: Params) -> Params:
            # Hessian-vector product by reverse over reverse: ∇φ ⟨∇φ L_support(φ), v⟩.
            hv = grad(lambda f: _dot(support_grad(f, w0), v))(f0)
            return {k: (1 + self.cg_damping) * v[k] + hv[k] / self.lam for k in v}

        v = conjugate_gradient(matvec, _detach(g_fast), self.cg_steps)
        out = dict(v)
        if slow:
            mixed = grad(lambda w: _dot(support_grad(f0, w), v))(w0)
            out.update({k: g_slow[k] - mixed[k] / self.lam for k in slow})
        return _detach(out), {"pre_loss": pre.detach(), "post_loss": post.detach()}

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
        """``scale`` times the summed implicit meta-gradients and metrics of one chunk of tasks: MetaLearner's
        ``_meta_gradient`` takes ``task_chunk(n)`` tasks at a time (``vectorize=k``) and sums the chunks."""
        grads, aux = self.map_tasks(self._task_gradient, ({**frozen, **params}, meta, frozenset(params)), tasks)
        aux = {k: v.sum() * scale for k, v in aux.items()}
        gp = {k: grads[k].sum(0) * scale if k in grads else torch.zeros_like(v) for k, v in params.items()}
        return gp, {k: torch.zeros_like(v) for k, v in meta.items()}, {"loss": aux["post_loss"], **aux}

