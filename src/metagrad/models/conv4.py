"""The Conv-4 network of the few-shot image classification literature (Vinyals et al. 2016; MAML; Reptile).

Four blocks of 3x3 convolution (``hidden`` filters, padding 1), batch norm, ReLU and 2x2 max-pooling, then a
linear head to ``ways`` logits. For 28x28 Omniglot the feature map ends at 1x1, so the head sees ``hidden``
features (the MAML code's Omniglot variant uses strided convolutions instead of pooling; this is the
pooling variant of Vinyals et al., Snell et al. and MAML's MiniImagenet network).

Two batch-norm modes, chosen with ``bn``:

* ``"transductive"`` (MAML's choice): ``nn.BatchNorm2d(track_running_stats=False)`` has no buffers, normalises
  every forward pass with the statistics of the batch it is given, in training and in evaluation alike, and
  learns one affine scale and shift per channel. Under ``functional_call`` + ``vmap`` each task is normalised
  with its own support (or query) statistics and nothing leaks from one task to another.
* ``"per_step"`` (MAML++, Antoniou et al. 2019, "BNWB" and "BNRS"): one affine scale and shift per channel
  *and per inner step* (``[steps + 1, C]``, row ``s`` used by the network after ``s`` inner steps), meta-learned
  in the outer loop and not adapted in the inner loop (``meta_only``), and per-step running statistics. The
  forward pass takes the step and, per call, which statistics to use: ``model(x, step, statistics="batch")``.
  Running statistics are *buffers* that only a forward pass with ``track=True`` updates:
  :meth:`metagrad.algorithms.MetaLearner.track_statistics` does so after each meta-step, outside every
  ``torch.func`` transform. Evaluation never writes them, so nothing leaks between evaluation tasks and there
  is no state to restore after each task. Normalisation uses the batch's statistics by default, as MAML++
  does; ``statistics="running"`` uses the running ones (the learner does so for query images only, see
  ``MetaLearner.query_statistics``, so that each query is classified on its own).

In both modes second-order gradients flow through the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.models.norm import BatchNorm2d, _full_precision
from metagrad.registry import register_model
from metagrad.transforms import in_inner_pass, under_vmap

__all__ = [
    "Conv4",
    "Conv4Config",
    "Conv3x3",
    "Conv4MiniImageNet",
    "Conv4MiniImageNetConfig",
    "PerStepBatchNorm2d",
    "BN_MODES",
    "BN_STATISTICS",
]

BN_MODES = ("transductive", "per_step")
BN_STATISTICS = ("batch", "running")


class PerStepBatchNorm2d(nn.Module):
    """Batch norm with an affine scale/shift and running statistics per inner step (MAML++).

    ``forward(x, step, statistics, track)`` uses row ``min(step, steps)``: adapting for more steps than were
    meta-trained reuses the last row. ``statistics`` is ``"batch"`` (normalise with ``x``'s own statistics) or
    ``"running"``; ``track=True`` (outside ``torch.func`` transforms only) folds the batch's statistics into the
    running ones with ``momentum``.
    """

    def __init__(self, channels: int, steps: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.steps, self.eps, self.momentum = int(steps), float(eps), float(momentum)
        self.weight = nn.Parameter(torch.ones(steps + 1, channels))
        self.bias = nn.Parameter(torch.zeros(steps + 1, channels))
        self.register_buffer("running_mean", torch.zeros(steps + 1, channels))
        self.register_buffer("running_var", torch.ones(steps + 1, channels))

    def forward(self, x: Tensor, step: int = 0, statistics: str = "batch", track: bool = False) -> Tensor:
        x = _full_precision(x)
        s = min(max(int(step), 0), self.steps)
        if statistics == "running":
            mean, var = self.running_mean[s], self.running_var[s]
        elif statistics == "batch":
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), correction=0)
            if track:
                with torch.no_grad():
                    n = x.numel() // x.shape[1]
                    self.running_mean[s].lerp_(mean.detach(), self.momentum)
                    self.running_var[s].lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
        else:
            raise ValueError(f"statistics must be one of {BN_STATISTICS}, got {statistics!r}")
        scale = self.weight[s] * torch.rsqrt(var + self.eps)
        return x * scale[:, None, None] + (self.bias[s] - mean * scale)[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, steps={self.steps}, momentum={self.momentum}"


@dataclass
class Conv4Config:
    """``[model]`` options of Conv-4 (``name = "conv4"``): filters per layer and the batch-norm mode."""

    channels: int = 64
    # "transductive" (MAML) or "per_step" (MAML++: per-step affine weights and running statistics)
    bn: str = "transductive"
    # How the 3x3 convolutions compute (Conv3x3.products): "auto" (a matrix product over patches where it was
    # measured faster: the first layer's few channels on the CPU, every layer under vmap on a GPU), true (every
    # layer), false (oneDNN's or cuDNN's convolution everywhere: on a GPU a quarter less memory, slower).
    products: bool | str = "auto"


@register_model("conv4", config=Conv4Config)
class Conv4(nn.Module):
    """``Conv4(in_channels=1, ways=5, hidden=64, image_size=28, bn="transductive", steps=0, products=None)``:
    [N, in_channels, S, S] -> [N, ways] logits. ``forward(x, step=0, statistics="batch", track=False)``: the
    step and the other options matter only with per-step BN (see the module docstring). ``products`` sets every
    convolution's :attr:`Conv3x3.products` (``None``: each chooses).
    """

    def __init__(
        self,
        in_channels: int = 1,
        ways: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        bn: str = "transductive",
        steps: int = 0,
        products: bool | None = None,
    ) -> None:
        super().__init__()
        if min(int(in_channels), int(ways), int(hidden), int(image_size)) <= 0:
            raise ValueError(
                f"in_channels, ways, hidden and image_size must be positive, got {in_channels}, {ways}, {hidden}, "
                f"{image_size}"
            )
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        side = int(image_size)
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for four 2x2 poolings, got {image_size}")
        self.in_channels, self.ways = int(in_channels), int(ways)
        self.hidden, self.image_size, self.bn = int(hidden), int(image_size), bn
        self.per_step = bn == "per_step"
        # Meta-learned in the outer loop only: per-step BN rows are indexed by the inner step, so adapting them
        # in the inner loop would mean nothing (MAML++ does not either).
        self.meta_only: tuple[str, ...] = ()
        convs, norms = [], []
        channels = self.in_channels
        for _ in range(4):
            convs.append(Conv3x3(channels, self.hidden))
            if products is not None:  # (else the class's choice, which a user may set on Conv3x3 itself)
                convs[-1].products = bool(products)
            if self.per_step:
                norms.append(PerStepBatchNorm2d(self.hidden, steps))
            else:
                norms.append(BatchNorm2d(self.hidden, affine=True, track_running_stats=False))
            channels = self.hidden
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        if self.per_step:
            self.meta_only = ("norms.",)
        self.head = nn.Linear(self.hidden * side * side, self.ways)

    @classmethod
    def from_config(cls, options: Conv4Config, spec: Any) -> Conv4:
        """Built for the task's images ``[C, S, S]`` and its number of ways."""
        from metagrad.errors import ConfigError

        shape = tuple(spec.input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ConfigError(f"model conv4 needs square images [C, S, S] as inputs; the task gives {shape}")
        if options.products not in ("auto", True, False):
            raise ConfigError(f"model.products must be \"auto\", true or false, got {options.products!r}")
        products = None if options.products == "auto" else options.products
        return cls(shape[0], spec.outputs, options.channels, shape[1], options.bn, spec.inner_steps, products)

    def forward(self, x: Tensor, step: int = 0, statistics: str = "batch", track: bool = False) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Conv4 expects [N, C, H, W] images, got shape {tuple(x.shape)}")
        if not self.per_step and (statistics != "batch" or track):
            raise ValueError("running statistics need per-step batch norm (Conv4(bn='per_step'))")
        # Channels-last activations: PyTorch's CPU max-pooling is an order of magnitude faster on them than on
        # NCHW, and oneDNN's convolutions and batch norm take them natively (vmap cannot change memory formats).
        # Except the learner's inner-loop (support) passes on the CPU: NCHW ran them faster, by 5-11 % of a
        # 1-step and 8-24 % of a 5-step MAML iteration (A/B runs by hand, docs/results.md), while the query
        # passes, even of 25 images, ran 14-15 % slower in NCHW.
        if not under_vmap() and not _nchw_pass(x):
            x = x.contiguous(memory_format=torch.channels_last)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = conv(x)
            x = norm(x, step, statistics, track) if self.per_step else norm(x)
            # ReLU after the pooling: the same function (a monotone map commutes with max), on a quarter of the
            # elements; the derivatives are the same too (both route the gradient to the same maximum).
            x = nn.functional.relu(nn.functional.max_pool2d(x, 2))
        return self.head(x.flatten(1))


def _nchw_pass(x: Tensor) -> bool:
    """Whether Conv-4 runs this pass in NCHW: a learner's inner-loop pass on the CPU (outside ``vmap``)."""
    return not under_vmap() and x.device.type == "cpu" and in_inner_pass()  # no hint read while compiling


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` (same parameters, ``state_dict`` and hooks) whose forward pass on an
    input with few channels (Omniglot's one) is one matrix product over 3x3 patches: oneDNN's convolution runs
    such an input at a few percent of the machine's speed and returns NCHW, the product is several times faster
    and its result is channels-last already. A learner's inner-loop passes on the CPU, which Conv-4 runs in
    NCHW, take oneDNN's convolution: on their few support images it was faster than the product and a copy.

    ``products``: ``None`` (that choice, and on a GPU under ``vmap`` the product for every input: one batched
    matrix product over the tasks instead of cuDNN's slow grouped convolution; measured with per-task weights,
    it also applies to weights the tasks share and to any compiled pass, which is traced as if under ``vmap``),
    ``True`` (the product for every input) or ``False`` (the convolution).

    ``patches``: how the product gathers the 3x3 patches, the same numbers by different kernels (both tested to
    second order under ``vmap``):

    * ``"blocks"`` (the default): nine shifted views of the padded channels-last input stacked in one copy, in
      ``(kh, kw, c)`` order (the weight permuted to match), so that each view's channels move as whole rows. Its
      backward pass is the adjoint written out (:class:`_Patches`): nine in-place additions into one
      gradient, where autograd's slices of a padded tensor would make nine zero-filled full-size gradients and
      add them up (``benchmarks/conv_patches.py`` times one convolution each way).
    * ``"shifts"``: the same views interleaved in the weight's own ``(c, kh, kw)`` order and left to autograd.

    On an H100 (20-way Omniglot MAML, docs/results.md) the blocks left to autograd ran 11.6 meta-iterations/s,
    the shifts 9.6 and cuDNN's grouped convolutions 6.6; ``F.unfold`` (7.1) and a one-hot depthwise convolution
    (1.1) were slower still and were dropped. The written-out adjoint came after that measurement.
    """

    products: bool | None = None
    patches: str = "blocks"

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        products = self.products
        if products is None:  # an inner pass: oneDNN's NCHW convolution beat the product + a copy; under vmap
            # on a GPU, the batched product beat cuDNN's grouped convolution 11.6 to 6.6 it/s (docs/results.md)
            products = (c * 9 <= 64 and not _nchw_pass(x)) or (under_vmap() and x.device.type == "cuda")
        if not products:
            return super().forward(x)
        patches = _PATCHES.get(self.patches)
        if patches is None:
            from metagrad.errors import ModelError

            raise ModelError(f"Conv3x3.patches must be one of {sorted(_PATCHES)}, got {self.patches!r}")
        weight = self.weight.permute(0, 2, 3, 1) if self.patches == "blocks" else self.weight  # [out, kh, kw, c]
        # Contiguous, so that autograd computes the weight's gradient as patches.T @ grad ([9, N] @ [N, 64]): for
        # a transposed view it keeps the view's layout, grad.T @ patches ([64, N] @ [N, 9]), 7x slower in oneMKL.
        weight = weight.reshape(self.out_channels, c * 9).t().contiguous()
        rows = patches(x)
        out = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)
        return out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)


def _shifted_patches(x: Tensor) -> Tensor:
    """The 3x3 patches of ``x`` as ``[n*h*w, c*9]``, features in the weight's ``(c, kh, kw)`` order: nine shifted
    views of the padded channels-last input stacked in one copy (on the CPU 1.6-3x faster than ``F.unfold`` and a
    transpose)."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    shifted = [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return torch.stack(shifted, dim=-1).reshape(n * h * w, c * 9)


def _blocked_patches(x: Tensor) -> Tensor:
    """The 3x3 patches as ``[n*h*w, 9*c]`` in ``(kh, kw, c)`` order, each view's channels a block of whole rows."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    # Compiled, the gather is left to autograd: Dynamo cannot vmap a custom autograd function (PyTorch 2.13), and
    # Inductor plans the backward pass's memory itself.
    gathered = _gather(padded) if torch.compiler.is_compiling() else _Patches.apply(padded, False)
    return gathered.reshape(n * h * w, 9 * c)


def _gather(padded: Tensor) -> Tensor:
    """``[n, h+2, w+2, c]`` to its nine shifted ``[n, h, w, c]`` views, stacked as ``[n, h, w, 9, c]``."""
    h, w = padded.shape[1] - 2, padded.shape[2] - 2
    return torch.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], dim=-2)


def _scatter(patches: Tensor) -> Tensor:
    """The adjoint of :func:`_gather`: each of the nine views added back where it came from."""
    n, h, w, _, c = patches.shape
    out = patches.new_zeros(n, h + 2, w + 2, c)  # (under vmap, batched as patches is)
    for k in range(9):
        i, j = divmod(k, 3)
        out[:, i : i + h, j : j + w] += patches[:, :, :, k]
    return out


class _Patches(torch.autograd.Function):
    """:func:`_gather` (``adjoint=False``) or :func:`_scatter` (``True``): two linear maps, each the other's adjoint,
    so that each one's derivative, of every order, is the other. ``generate_vmap_rule``: under ``vmap`` both run on
    the batched tensors as written."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, adjoint: bool) -> Tensor:
        return _scatter(x) if adjoint else _gather(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, bool], output: Tensor) -> None:
        ctx.adjoint = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Patches.apply(grad, not ctx.adjoint), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> Tensor:  # forward mode: the map is linear
        return _scatter(tangent) if ctx.adjoint else _gather(tangent)


_PATCHES = {"blocks": _blocked_patches, "shifts": _shifted_patches}


@dataclass
class Conv4MiniImageNetConfig(Conv4Config):
    """``[model]`` options of MAML's miniImageNet network (``name = "conv4_miniimagenet"``): Conv-4 with 32 filters."""

    channels: int = 32


@register_model("conv4_miniimagenet", config=Conv4MiniImageNetConfig)
class Conv4MiniImageNet(Conv4):
    """The MAML paper's miniImageNet network (Finn et al. 2017): four blocks of 32 3x3 filters, batch norm, ReLU
    and 2x2 max-pooling on 84x84 RGB images (5x5x32 features into the head). In channels and size follow the task."""

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 5,
        hidden: int = 32,
        image_size: int = 84,
        bn: str = "transductive",
        steps: int = 0,
        products: bool | None = None,
    ) -> None:
        super().__init__(in_channels, ways, hidden, image_size, bn, steps, products)
