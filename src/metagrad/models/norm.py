"""Normalisation layers that are exact under ``torch.func`` (vmap of grad of grad), and the statistics they use.

PyTorch 2.13's ``F.batch_norm`` (training mode), ``F.instance_norm`` and ``F.layer_norm`` return wrong
second-order derivatives under ``vmap``: the gradient of a vmapped gradient through them is off by up to 1 % of
a meta-gradient's largest entry, silently (the plain loop is right; ``F.group_norm`` and eval-mode batch norm are
right). Second-order MAML through them is therefore wrong. Under ``vmap`` (and ``torch.compile``) the layers here
compute the same functions from ``mean``, ``var`` and ``rsqrt``, whose derivatives ``torch.func`` batches
correctly; everywhere else they call PyTorch's fused kernels, which are exact there to second order, all that
meta-learning needs, and faster (on channels-last CPU input, with precise float32 statistics when the learner asks
for them: see ``_PreciseBatchNorm``). A third derivative through PyTorch's training-mode ``F.batch_norm`` is wrong
even without ``vmap`` (a float64 ``gradgradcheck`` of its gradient fails; the composite form passes).
``tests/test_norm.py`` checks both against float64 central differences and holds a canary that fails the day
PyTorch's own kernels are fixed.

:func:`make_exact` swaps the class of every stock ``nn.BatchNorm*d``, ``nn.InstanceNorm*d`` and ``nn.LayerNorm``
in a model for the exact subclass here (same parameters, buffers, ``state_dict`` keys and ``isinstance``), so a
user's own network is exact without any change; a :class:`metagrad.MetaLearner` calls it on its model.

Batch statistics. Outside metagrad these layers behave exactly like PyTorch's: batch statistics in ``train()``
(and the running ones updated in place), running statistics in ``eval()``. Inside metagrad's transforms the
learner chooses per call, with :func:`statistics`: the support set is always normalised with its own
statistics (transductive, as in MAML), query images with the batch's statistics or the running ones, and running
statistics are never written there (an in-place update inside ``grad``/``vmap`` is an error, and evaluation must
not leak one task into the next); the learner updates them in a plain forward pass after each meta-step.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.transforms import under_vmap

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "current_mode",
    "make_exact",
    "statistics",
    "STATISTICS",
]

STATISTICS = ("batch", "running")


class _Mode(threading.local):
    """What metagrad's learner asks of batch-norm layers right now (``None``: PyTorch's own behaviour), per
    thread: tasks on several threads (:mod:`metagrad.task_threads`) each set their own passes' mode."""

    statistics: str | None = None  # "batch" or "running" for every batch norm that has running statistics
    track: bool | None = None  # whether a batch-statistics pass folds into the running statistics
    precise: bool = False  # whether a CPU batch norm on channels-last input accumulates precisely


_MODE = _Mode()


def current_mode() -> tuple[str | None, bool | None, bool]:
    """This thread's batch-norm mode, ``(statistics, track, precise)``: ``statistics(*mode)`` sets it on another."""
    return _MODE.statistics, _MODE.track, _MODE.precise


@contextlib.contextmanager
def statistics(which: str | None, track: bool | None = False, precise: bool | None = None) -> Iterator[None]:
    """Within the block, batch norms normalise with ``which`` statistics (``"batch"`` or ``"running"``; layers
    without running statistics always use the batch's) and update their running statistics only if ``track``.
    ``None`` restores PyTorch's behaviour (by ``module.training``). ``precise=True`` gives float32-precise batch
    statistics on the CPU also for channels-last inputs (see :class:`_PreciseBatchNorm`); ``None`` keeps the
    current choice."""
    if which is not None and which not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {which!r}")
    saved = (_MODE.statistics, _MODE.track, _MODE.precise)
    _MODE.statistics, _MODE.track = which, track
    if precise is not None:
        _MODE.precise = bool(precise)
    try:
        yield
    finally:
        _MODE.statistics, _MODE.track, _MODE.precise = saved


def _native() -> bool:
    """Whether PyTorch's fused kernel may run here: it is exact, first and second order, wherever no ``vmap`` is
    active, and faster than the composite form (which Inductor fuses under ``torch.compile``)."""
    return not under_vmap()


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-D or 5-D tensor in channels-last memory (and not also plain contiguous)."""
    layouts = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.dim() in layouts and not x.is_contiguous() and x.is_contiguous(memory_format=layouts[x.dim()])


class _PreciseBatchNorm(torch.autograd.Function):
    """Training-mode batch norm with precisely accumulated statistics, for channels-last input on the CPU.

    PyTorch 2.13's CPU batch norm on a channels-last float32 input (Conv-4's activations, for its pooling's
    sake) accumulates its statistics imprecisely: over the first layer on 75 Omniglot images (58,800 values a
    channel) its mean is off by up to 9e-4 standard deviations and its 1/std by 1e-4 relative, where the NCHW
    kernel is right to 2e-7 on the same tensor; a second-order MAML meta-gradient was 1.25e-2 off float64's
    with it when every pass was channels-last, and is 5.7e-4 off now that Conv-4's inner-loop passes run NCHW
    (``benchmarks/precision.py``).

    Here the statistics are two passes of PyTorch's cascaded sums over the channels-last memory seen as a
    (values, channels) matrix, without a copy, and the normalisation is PyTorch's eval-mode kernel given them.
    The backward pass is PyTorch's training-mode one (``native_batch_norm_backward``) given the same
    statistics, and its derivative is PyTorch's double backward of batch norm: exact to second order, which is
    what MAML needs; a third order is as wrong as PyTorch's own batch norm's, and forward-mode AD (``jvp``) is
    not implemented (the fused kernel, ``learner.precise_norms = False``, has both as PyTorch does). As with
    ``F.batch_norm``, a bias without a weight (never the case in ``nn.BatchNorm*d``) loses one second-order
    term.
    The meta-gradient above comes within 2.5e-4 of float64's, a GPU's float32 figure; what is left is the
    backward kernel's own imprecise sums on channels-last input (7e-6 with NCHW copies in the backward pass,
    which made the step 15-23 % slower, measured once before the inner-loop passes ran NCHW). The previous
    round's NCHW copies in both passes (1.05e-4) took a third of the step's time."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        values = x.movedim(1, -1).reshape(-1, x.shape[1])  # a view: channels are innermost in memory
        # Two passes of PyTorch's cascaded sums: 5x faster here than var_mean's Welford loop over the rows.
        mean = values.sum(0) / values.shape[0]
        centred = values - mean
        var = centred.mul_(centred).sum(0) / values.shape[0]
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        return y, mean, torch.rsqrt(var + eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - autograd's signature
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return gx, gw, gb, None


def _batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """PyTorch's training-mode batch norm, with precise statistics on channels-last CPU input when the learner
    asks for them (``_MODE.precise``; see :class:`_PreciseBatchNorm`). Plain PyTorch use of these layers keeps
    PyTorch's kernel."""
    # Never reached under torch.compile, which takes the composite form (metagrad.transforms.under_vmap). Half
    # precision keeps PyTorch's kernel, which accumulates in float32 (its statistics here would round).
    precise = _MODE.precise and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if precise and _channels_last(x):
        return _PreciseBatchNorm.apply(x, weight, bias, eps)[0]
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def _full_precision(x: Tensor) -> Tensor:
    """Under autocast, a half-precision activation in float32: statistics over a batch lose too much in 8 bits."""
    if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


def _channel_view(t: Tensor, dims: int) -> Tensor:
    return t.reshape((1, -1) + (1,) * (dims - 2))


class _ExactBatchNorm:
    """Batch norm from mean / biased variance / rsqrt (see the module docstring for when each statistic is used)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        x = _full_precision(x)
        has_running = self.running_mean is not None
        which = _MODE.statistics or ("batch" if self.training else "running")
        track = _MODE.track if _MODE.track is not None else self.training
        native = _native()
        if which == "running" and has_running:
            if native:
                running = (self.running_mean, self.running_var)
                return F.batch_norm(x, *running, self.weight, self.bias, False, 0.0, self.eps)
            mean, var = self.running_mean, self.running_var
        else:
            fold = track and has_running and self.track_running_stats
            if native and not fold:
                return _batch_norm(x, self.weight, self.bias, self.eps)
            dims = (0, *range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, correction=0)
            if fold:
                self._fold(x, mean, var)
        inv = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = self.weight * inv
            shift = self.bias - mean * scale
        else:
            scale, shift = inv, -mean * inv
        return x * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())

    @torch.no_grad()
    def _fold(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        n = x.numel() // x.shape[1]
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # a cumulative average: 1 / count, read on the device (a CUDA graph replays no host read)
            momentum = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        self.running_mean.lerp_(mean.detach(), momentum)
        self.running_var.lerp_(var.detach() * n / max(n - 1, 1), momentum)


class _ExactInstanceNorm:
    """Instance norm (per sample and channel, batch statistics only) from mean / biased variance / rsqrt."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        unbatched = x.dim() == self._get_no_batch_dim()
        if unbatched:
            x = x.unsqueeze(0)
        if _native():
            out = F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return out.squeeze(0) if unbatched else out
        dims = tuple(range(2, x.dim()))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * _channel_view(self.weight, x.dim()) + _channel_view(self.bias, x.dim())
        return out.squeeze(0) if unbatched else out


class _ExactLayerNorm:
    """Layer norm over the trailing ``normalized_shape`` from mean / biased variance / rsqrt."""

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        if tuple(x.shape[x.dim() - len(dims) :]) != tuple(self.normalized_shape):
            raise RuntimeError(
                f"LayerNorm{tuple(self.normalized_shape)} got input of shape {tuple(x.shape)}: its last dimensions "
                "must equal normalized_shape"
            )
        if _native():
            return F.layer_norm(x, self.normalized_shape, self.weight, getattr(self, "bias", None), self.eps)
        mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if getattr(self, "bias", None) is not None:
            out = out + self.bias
        return out


class BatchNorm1d(_ExactBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d``, exact under ``torch.func`` (see the module docstring)."""


class BatchNorm2d(_ExactBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d``, exact under ``torch.func`` (see the module docstring)."""


class BatchNorm3d(_ExactBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d``, exact under ``torch.func`` (see the module docstring)."""


class InstanceNorm1d(_ExactInstanceNorm, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d``, exact under ``torch.func``."""


class InstanceNorm2d(_ExactInstanceNorm, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d``, exact under ``torch.func``."""


class InstanceNorm3d(_ExactInstanceNorm, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d``, exact under ``torch.func``."""


class LayerNorm(_ExactLayerNorm, nn.LayerNorm):
    """``nn.LayerNorm``, exact under ``torch.func``."""


_EXACT: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d,
    nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
    nn.LayerNorm: LayerNorm,
}
_AFFECTED = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)


def make_exact(model: nn.Module) -> list[str]:
    """Swap, in place, the class of every stock PyTorch batch, instance and layer norm in ``model`` for its exact
    subclass here; returns the names of the layers swapped.

    Parameters, buffers, hooks and ``state_dict`` keys are untouched and ``isinstance(m, nn.BatchNorm2d)`` still
    holds. A norm layer of a user's own subclass is left as it is (its ``forward`` is the user's), with a warning
    if it still calls PyTorch's kernel, and an instance norm with running statistics is refused."""
    swapped = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _EXACT:
            if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
                raise ValueError(
                    f"{name or 'model'}: {cls.__name__}(track_running_stats=True) is not supported by metagrad; use "
                    "track_running_stats=False (the default) or a BatchNorm"
                )
            module.__class__ = _EXACT[cls]
            swapped.append(name)
        elif isinstance(module, _AFFECTED) and not isinstance(module, tuple(_EXACT.values())):
            owner = next(c for c in cls.__mro__ if "forward" in vars(c))
            if owner.__module__.startswith("torch."):
                warnings.warn(
                    f"{name}: {cls.__name__} subclasses a PyTorch norm layer whose second-order derivatives are wrong "
                    "under vmap (torch 2.13); subclass metagrad.models.norm's exact layer instead",
                    stacklevel=2,
                )
    return swapped
