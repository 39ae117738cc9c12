"""Prototypical Networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017).

Each class's prototype is the mean of its embedded support points; a query's logits are the negative squared
Euclidean distances to the prototypes, ``-‖f(x) − c_k‖²`` (the paper's eq. 1-2), trained with cross-entropy.
There is no inner loop: evaluation reports one point (``steps`` = 0), whatever number of steps is asked for.
The embedding ``f`` is any backbone: by default the model without its ``head`` (Conv-4's 64 features, as in the
paper; ``ProtoNet`` replaces ``model.head`` by ``nn.Identity``), or the whole model if it has none;
``keep_head=True`` embeds with the whole model. Classification only: on a regression task it refuses with
:class:`NotClassificationError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.algorithms.base import MetaLearner, Params, Task, _detach
from metagrad.errors import ConfigError, DataError
from metagrad.inner.sgd import SGD
from metagrad.registry import register_algorithm
from metagrad.tasks.base import TaskBatch

__all__ = ["ProtoNet", "ProtoNetConfig", "NotClassificationError", "PROTOTYPES", "prototype_logits"]

# Key under which adapt() returns the prototypes beside the weights (a colon is never in a parameter's name).
PROTOTYPES = "protonet:prototypes"


class NotClassificationError(ConfigError):
    """An algorithm for classification only (Prototypical Networks) was asked to run a regression task."""


@dataclass
class ProtoNetConfig:
    """``[algorithm]`` options of Prototypical Networks (``name = "protonet"``). ``keep_head = true`` embeds with
    the model's linear head too (default: the embedding is the backbone's features, as in the paper)."""

    keep_head: bool = False


def prototype_logits(support: Tensor, labels: Tensor, query: Tensor, ways: int) -> Tensor:
    """``-‖query_i − c_k‖²`` for class means ``c_k`` of the embedded ``support`` ([K, D], labels [K], query [Q, D])."""
    onehot = F.one_hot(labels, ways).to(support.dtype)  # [K, W]
    prototypes = onehot.T @ support / onehot.sum(0)[:, None]
    return -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)


def _refuse_regression(loss: Any) -> None:
    if loss != "cross_entropy":
        raise NotClassificationError(
            f"protonet classifies by distance to class prototypes and does not apply to this task (loss {loss!r}, "
            "not cross_entropy): use it on a classification task such as omniglot, or choose maml, cavia or imaml"
        )


@register_algorithm("protonet", config=ProtoNetConfig)
class ProtoNet(MetaLearner):
    """``ProtoNet(embedding, ways=5)``: prototypical classification with ``embedding`` (any ``nn.Module``). A
    ``head`` submodule of ``embedding`` is replaced by ``nn.Identity`` unless ``keep_head=True``."""

    name = "protonet"

    def __init__(
        self, model: nn.Module, *, ways: int, keep_head: bool = False, loss: Any = "cross_entropy", **kwargs: Any
    ) -> None:
        _refuse_regression(loss)
        if int(ways) < 2:
            raise ConfigError(f"protonet needs at least 2 ways, got {ways}")
        if not keep_head and isinstance(getattr(model, "head", None), nn.Module):
            model.head = nn.Identity()  # the embedding is the backbone's features (Snell et al., section 3)
        kwargs.pop("inner_steps", None)
        # No inner loop: the rule is never applied (lr 0 keeps it an honest no-op if it were).
        super().__init__(model, SGD(0.0), inner_steps=0, loss=loss, **kwargs)
        self.ways = int(ways)

    @classmethod
    def from_config(cls, options: ProtoNetConfig, model: nn.Module, spec: Any) -> ProtoNet:
        _refuse_regression(spec.loss)
        return cls(model, ways=spec.outputs, keep_head=options.keep_head, **cls.spec_options(spec))

    # ----- the rule ------------------------------------------------------------------------------------
    def embed(self, params: Params, x: Tensor, statistics: str = "batch") -> Tensor:
        return self.network(params, x, 0, statistics).flatten(1)

    def logits(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, statistics: str = "batch") -> Tensor:
        """Query logits of one task: support and query embedded separately (each batch normalised on its own)."""
        return prototype_logits(self.embed(params, sx), sy, self.embed(params, qx, statistics), self.ways)

    def task_loss(
        self, params: Params, meta: Params, task: Task, weights: Tensor | None, first_order: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sx, sy, qx, qy = task
        loss = self.loss_fn(self.logits(params, sx, sy, qx), qy)
        return loss, {"pre_loss": loss.detach(), "post_loss": loss.detach()}

    # ----- input checks: labels index the prototypes, not the embedding's outputs ---------------------------
    def _check_targets(self, batch: TaskBatch) -> None:
        for field in ("support_y", "query_y"):
            y = getattr(batch, field)
            if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 2:
                shape = tuple(y.shape)
                raise DataError(f"TaskBatch.{field} must hold integer class labels [B, N], got {y.dtype} {shape}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.ways):
                raise DataError(
                    f"TaskBatch.{field} holds labels in [{int(y.min())}, {int(y.max())}] but protonet was built for "
                    f"{self.ways} ways: labels must be in [0, {self.ways})"
                )
        counts = F.one_hot(batch.support_y, self.ways).sum(1)
        if bool((counts == 0).any()):
            raise DataError(
                f"every task's support set needs at least one example of each of the {self.ways} classes (a class "
                "without one has no prototype)"
            )

    # ----- evaluation: one point, no inner steps ------------------------------------------------------
    def _curve(self, params: Params, meta: Params, steps: int, task: Task) -> Tensor:
        """One column whatever ``steps`` is: there is no inner loop (evaluation reads it as step 0)."""
        sx, sy, qx, qy = task
        return self.metric_fn(self.logits(params, sx, sy, qx, self.query_mode()), qy).detach()[None]

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int | None = None,
        params: Params | None = None,
        dropout: bool = False,
    ) -> Params:
        """The weights and this task's prototypes (under :data:`PROTOTYPES`), for :meth:`predict`."""
        if steps not in (None, 0):
            raise ConfigError(f"protonet has no inner loop: steps must be 0, got {steps}")
        self._check_task(support_x, support_y)
        p = _detach(self.params if params is None else params)
        with self._random_layers(dropout), self._numerics(support_x), torch.no_grad():
            z = self.embed(p, support_x)
            onehot = F.one_hot(support_y.reshape(-1).long(), self.ways).to(z.dtype)
            if bool((onehot.sum(0) == 0).any()):
                raise DataError(f"the support set needs at least one example of each of the {self.ways} classes")
            prototypes = onehot.T @ z / onehot.sum(0)[:, None]
        return {**p, PROTOTYPES: prototypes}

    @torch.no_grad()
    def predict(
        self, x: Tensor, params: Params | None = None, step: int | None = None, dropout: bool = False
    ) -> Tensor:
        """Logits ``-‖f(x) − c_k‖²`` if ``params`` came from :meth:`adapt`, else the embedding of ``x``."""
        p = dict(self.params if params is None else params)
        prototypes = p.pop(PROTOTYPES, None)
        with self._random_layers(dropout), self._numerics(x):
            z = self.embed(_detach(p), x, self.query_mode())
        if prototypes is None:
            return z
        return -((z[:, None, :] - prototypes[None]) ** 2).sum(-1)
