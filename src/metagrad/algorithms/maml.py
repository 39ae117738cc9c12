"""MAML (Finn, Abbeel & Levine, ICML 2017) and first-order MAML, with the MAML++ training options.

The whole update rule: adapt with the inner rule on the support set, score the adapted weights on the query
set. Second order unless ``first_order``. MAML++ (Antoniou et al., ICLR 2019): ``multi_step_loss`` scores
every inner step with weights that anneal towards the last one for ``msl_epochs`` epochs, then the last step
alone, as in MAML++'s code; ``first_order_iterations`` trains first order before switching to second order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import MetaLearner, Params, Task
from metagrad.errors import ConfigError
from metagrad.inner.base import Chain, InnerRule
from metagrad.inner.curvature import Curvature
from metagrad.inner.lslr import LSLR
from metagrad.inner.sgd import SGD
from metagrad.registry import register_algorithm

__all__ = ["MAML", "MAMLConfig", "multi_step_weights", "fomaml", "check_switches"]


def check_switches(options: Any, needs: dict[str, str]) -> None:
    """Refuse a key set away from its default while the switch that makes it matter is off: it would be ignored."""
    defaults = type(options)()
    for key, switch in needs.items():
        if getattr(options, key) != getattr(defaults, key) and not getattr(options, switch):
            raise ConfigError(f"algorithm.{key} applies only with algorithm.{switch} = true (it would be ignored)")


@dataclass
class MAMLConfig:
    """``[algorithm]`` options of MAML (``name = "maml"``, or ``"fomaml"``: first order). ``lslr`` and
    ``curvature`` switch on learned per-step rates and Meta-Curvature (ablations of MAML Enhanced); ``anil``
    adapts the last layer only."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    eval_inner_lr: float | None = None
    first_order: bool = False
    anil: bool = False
    lslr: bool = False
    per_layer_lr: bool = False
    curvature: bool = False
    rate_parameterization: str = "log"
    lslr_beyond: str = "stop"
    multi_step_loss: bool = False
    msl_epochs: int = 10
    epoch_iterations: int = 500
    first_order_iterations: int = 0

    def validate(self, cfg: Any) -> None:
        check_switches(self, {"per_layer_lr": "lslr", "rate_parameterization": "lslr", "lslr_beyond": "lslr",
                              "msl_epochs": "multi_step_loss", "epoch_iterations": "multi_step_loss"})  # fmt: skip
        if (self.lslr or self.curvature) and self.inner_steps == 0:
            raise ConfigError("algorithm.inner_steps must be positive when lslr or curvature is on")
        if self.lslr and self.inner_lr <= 0:
            raise ConfigError("algorithm.inner_lr must be > 0 for learned rates (they start at it)")
        if self.eval_inner_lr is not None and (self.lslr or self.curvature):
            raise ConfigError(
                "algorithm.eval_inner_lr cannot be set for learned inner rules: they adapt with what they learned"
            )


def multi_step_weights(steps: int, epoch: int, anneal_epochs: int) -> list[float]:
    """MAML++ multi-step loss weights at ``epoch``: uniform at first, annealed towards the last step.

    Non-final ``max(1/N − e/(N·E), 0.03/N)``; final ``min(1/N + e(N−1)/(N·E), 1 − 0.03(N−1)/N)``.
    """
    n, e, big_e = steps, epoch, max(anneal_epochs, 1)
    if n <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if n == 1:
        return [1.0]
    non_final = max(1 / n - e / (n * big_e), 0.03 / n)
    final = min(1 / n + e * (n - 1) / (n * big_e), 1 - 0.03 * (n - 1) / n)
    return [non_final] * (n - 1) + [final]


@register_algorithm("maml", config=MAMLConfig)
class MAML(MetaLearner):
    """MAML with any inner rule (plain SGD by default)."""

    name = "maml"

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule | None = None,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        multi_step_loss: bool = False,
        msl_epochs: int = 10,
        epoch_iterations: int = 500,
        first_order_iterations: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(model, rule if rule is not None else SGD(inner_lr), inner_steps=inner_steps, **kwargs)
        if first_order:
            self.name = "fomaml"
        self.first_order = first_order
        self.multi_step_loss = multi_step_loss  # over one step it is the plain loss
        self.msl_epochs = msl_epochs
        self.epoch_iterations = max(int(epoch_iterations), 1)
        self.first_order_iterations = int(first_order_iterations)

    @classmethod
    def from_config(cls, options: MAMLConfig, model: nn.Module, spec: Any) -> MAML:
        a = options
        rate: InnerRule = (
            LSLR(a.inner_lr, a.inner_steps, a.per_layer_lr, a.rate_parameterization, a.lslr_beyond)
            if a.lslr
            else SGD(a.inner_lr)
        )
        return cls(
            model,
            Chain(Curvature(), rate) if a.curvature else rate,
            inner_lr=a.inner_lr,
            inner_steps=a.inner_steps,
            first_order=a.first_order,
            multi_step_loss=a.multi_step_loss,
            msl_epochs=a.msl_epochs,
            epoch_iterations=a.epoch_iterations,
            first_order_iterations=a.first_order_iterations,
            eval_rule=SGD(a.eval_inner_lr) if a.eval_inner_lr is not None else None,
            adapt_only=cls.last_layer(model) if a.anil else None,
            **cls.spec_options(spec),
        )

    def schedule(self, iteration: int) -> tuple[Tensor | None, bool]:
        """The multi-step loss weights for ``iteration`` (None: the last step's loss alone) and whether its
        meta-gradient is first order. The multi-step loss lasts ``msl_epochs`` epochs of ``epoch_iterations``;
        after them the last step's loss alone trains, as in MAML++'s own code (Antoniou et al. 2019), which also
        spares the query passes of the other steps."""
        first_order = self.first_order or iteration < self.first_order_iterations
        epoch = iteration // self.epoch_iterations
        if not (self.multi_step_loss and self.inner_steps > 1 and epoch < self.msl_epochs):
            return None, first_order
        w = multi_step_weights(self.inner_steps, epoch, self.msl_epochs)
        ref = next(iter(self._named_parameters().values()))
        return torch.tensor(w, dtype=ref.dtype, device=ref.device), first_order

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sx, sy, qx, qy = task
        if self.inner_steps == 0:
            pre = self.loss(params, qx, qy)
            return pre, {"pre_loss": pre.detach(), "post_loss": pre.detach()}
        aux = {}
        if self.diagnostics:  # a whole query forward pass that the meta-gradient does not need
            with torch.no_grad():
                aux["pre_loss"] = self.loss(params, qx, qy)
        losses = []
        state = None
        for step in range(self.inner_steps):
            params, state = self.inner_step(params, meta, sx, sy, step, self.rule, first_order, state)
            if weights is not None or step == self.inner_steps - 1:
                losses.append(self.loss(params, qx, qy, step + 1))
        loss = (weights * torch.stack(losses)).sum() if weights is not None else losses[-1]
        return loss, {**aux, "post_loss": losses[-1].detach()}


# First-order MAML's options: MAML's, less ``first_order`` (it is what the name says).
FOMAMLConfig = dataclasses.make_dataclass(
    "FOMAMLConfig",
    [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(MAMLConfig)
     if f.name != "first_order"],
    namespace={"validate": MAMLConfig.validate, "__doc__": "``[algorithm]`` options of first-order MAML."},
)  # fmt: skip


@register_algorithm("fomaml", config=FOMAMLConfig)
def fomaml(options: Any, model: nn.Module, spec: Any) -> MAML:
    """First-order MAML: MAML whose meta-gradient ignores second derivatives (Finn et al. 2017, section 5.2)."""
    return MAML.from_config(MAMLConfig(**dataclasses.asdict(options), first_order=True), model, spec)
