"""The Conv-4 network of the few-shot image classification literature (Vinyals et al. 2016; MAML; Reptile).

Four blocks of 3x3 convolution (``hidden`` filters, padding 1), batch norm, ReLU and a halving of the feature
map, then a linear head to ``ways`` logits. Two ways to halve it, chosen with ``downsample``:

* ``"pool"`` (the default): 2x2 max-pooling after each block, the network of Vinyals et al., Snell et al. and
  MAML's MiniImagenet network. For 28x28 Omniglot the feature map ends at 1x1, so the head sees ``hidden``
  features.
* ``"stride"``: every convolution at stride 2 and no pooling, then the mean over the last feature map (2x2 for
  28x28), so the head sees ``hidden`` features: the network of the MAML code's Omniglot experiments (Finn et
  al. 2017; its ``conv_block`` without ``max_pool``, and ``reduce_mean`` before the head). Its convolutions
  compute a quarter of the outputs, so a meta-iteration is about 3.5 times less arithmetic at 28x28
  (``benchmarks/conv4.py`` counts it). TensorFlow's ``SAME`` padding at stride 2 pads an even side on one edge
  only; this pads one pixel on each, which moves the sampled grid by a pixel and keeps every shape.

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
    "DOWNSAMPLING",
]

BN_MODES = ("transductive", "per_step")
BN_STATISTICS = ("batch", "running")
DOWNSAMPLING = ("pool", "stride")


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
    # "pool" (2x2 max-pooling after each block) or "stride" (strided convolutions and a mean over the last map:
    # the MAML code's Omniglot network, about 3.5x less arithmetic at 28x28)
    downsample: str = "pool"


@register_model("conv4", config=Conv4Config)
class Conv4(nn.Module):
    """``Conv4(in_channels=1, ways=5, hidden=64, image_size=28, bn="transductive", steps=0, products=None,
    downsample="pool")``: [N, in_channels, S, S] -> [N, ways] logits. ``forward(x, step=0, statistics="batch",
    track=False)``: the step and the other options matter only with per-step BN (see the module docstring).
    ``products`` sets every convolution's :attr:`Conv3x3.products` (``None``: each chooses); ``downsample``:
    ``"pool"`` or ``"stride"`` (the module docstring).
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
        downsample: str = "pool",
    ) -> None:
        super().__init__()
        if min(int(in_channels), int(ways), int(hidden), int(image_size)) <= 0:
            raise ValueError(
                f"in_channels, ways, hidden and image_size must be positive, got {in_channels}, {ways}, {hidden}, "
                f"{image_size}"
            )
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
        side = int(image_size)
        if downsample == "pool":
            for _ in range(4):
                side //= 2
            if side < 1:
                raise ValueError(f"image_size must be at least 16 for four 2x2 poolings, got {image_size}")
        else:
            side = 1  # (the head reads the mean over the last feature map)
        self.in_channels, self.ways = int(in_channels), int(ways)
        self.hidden, self.image_size, self.bn = int(hidden), int(image_size), bn
        self.downsample = downsample
        stride = 2 if downsample == "stride" else 1
        self.per_step = bn == "per_step"
        # Meta-learned in the outer loop only: per-step BN rows are indexed by the inner step, so adapting them
        # in the inner loop would mean nothing (MAML++ does not either).
        self.meta_only: tuple[str, ...] = ()
        convs, norms = [], []
        channels = self.in_channels
        for _ in range(4):
            convs.append(Conv3x3(channels, self.hidden, stride=stride))
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
        if options.downsample not in DOWNSAMPLING:
            raise ConfigError(f"model.downsample must be one of {', '.join(map(repr, DOWNSAMPLING))}, got "
                              f"{options.downsample!r}")  # fmt: skip
        products = None if options.products == "auto" else options.products
        return cls(shape[0], spec.outputs, options.channels, shape[1], options.bn, spec.inner_steps, products,
                   options.downsample)  # fmt: skip

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
        pool = self.downsample == "pool"
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = conv(x)
            x = norm(x, step, statistics, track) if self.per_step else norm(x)
            # ReLU after the pooling: the same function (a monotone map commutes with max), on a quarter of the
            # elements; the derivatives are the same too (both route the gradient to the same maximum).
            x = nn.functional.relu(nn.functional.max_pool2d(x, 2) if pool else x)
        return self.head(x.flatten(1) if pool else x.mean((2, 3)))


def _nchw_pass(x: Tensor) -> bool:
    """Whether Conv-4 runs this pass in NCHW: a learner's inner-loop pass on the CPU (outside ``vmap``)."""
    return not under_vmap() and x.device.type == "cpu" and in_inner_pass()  # no hint read while compiling


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, stride=stride, padding=1)`` (same parameters, ``state_dict`` and hooks; stride 2 in
    Conv-4's strided network) whose forward pass on an input with few channels (Omniglot's one) is one matrix
    product over 3x3 patches: oneDNN's convolution runs such an input at a few percent of the machine's speed
    and returns NCHW, the product is several times faster and its result is channels-last already. A learner's
    inner-loop passes on the CPU, which Conv-4 runs in NCHW, take oneDNN's convolution: on their few support
    images it was faster than the product and a copy.

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

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)

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
        stride = self.stride[0]
        rows = patches(x, stride)
        out = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)
        return out.view(n, _out(h, stride), _out(w, stride), self.out_channels).permute(0, 3, 1, 2)


def _out(size: int, stride: int) -> int:
    """A padded 3x3 convolution's output size along a side of ``size``."""
    return (size - 1) // stride + 1


def _view(padded: Tensor, k: int, stride: int, out: tuple[int, int]) -> Tensor:
    """View ``k`` (``(kh, kw) = divmod(k, 3)``) of the nine ``[n, ho, wo, c]`` views of a padded channels-last
    ``[n, h+2, w+2, c]`` that a 3x3 kernel reads: view ``(i, j)`` holds pixel ``(i + stride*y, j + stride*x)`` of
    ``padded`` at ``(y, x)``."""
    (i, j), (ho, wo), s = divmod(k, 3), out, stride
    return padded[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s]


def _shifted_patches(x: Tensor, stride: int = 1) -> Tensor:
    """The 3x3 patches of ``x`` as ``[n*ho*wo, c*9]``, features in the weight's ``(c, kh, kw)`` order: nine shifted
    views of the padded channels-last input stacked in one copy (on the CPU 1.6-3x faster than ``F.unfold`` and a
    transpose)."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    ho, wo = _out(h, stride), _out(w, stride)
    views = [_view(padded, k, stride, (ho, wo)) for k in range(9)]
    return torch.stack(views, dim=-1).reshape(n * ho * wo, c * 9)


def _blocked_patches(x: Tensor, stride: int = 1) -> Tensor:
    """The 3x3 patches as ``[n*ho*wo, 9*c]`` in ``(kh, kw, c)`` order, each view's channels a block of whole
    rows."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    # Compiled, the gather is left to autograd: Dynamo cannot vmap a custom autograd function (PyTorch 2.13), and
    # Inductor plans the backward pass's memory itself.
    if torch.compiler.is_compiling():
        gathered = _gather(padded, stride)
    else:
        gathered = _Patches.apply(padded, stride, 0, 0)
    return gathered.reshape(-1, 9 * c)


def _gather(padded: Tensor, stride: int = 1) -> Tensor:
    """``[n, h+2, w+2, c]`` to the nine ``[n, ho, wo, c]`` views a 3x3 kernel reads at ``stride``, stacked as
    ``[n, ho, wo, 9, c]``."""
    out = _out(padded.shape[1] - 2, stride), _out(padded.shape[2] - 2, stride)
    return torch.stack([_view(padded, k, stride, out) for k in range(9)], dim=-2)


def _scatter(patches: Tensor, stride: int = 1, size: tuple[int, int] | None = None) -> Tensor:
    """The adjoint of :func:`_gather`: each of the nine views added back where it came from, into a padded
    ``[n, *size, c]`` (``size``: the padded sides; by default those that a stride of 1 implies)."""
    n, ho, wo, _, c = patches.shape
    if size is None:
        if stride != 1:
            raise ValueError("_scatter needs the padded size at a stride above 1 (several sizes give one output)")
        size = (ho + 2, wo + 2)
    out = patches.new_zeros(n, *size, c)  # (under vmap, batched as patches is)
    for k in range(9):
        # Each view taken after the previous addition: views taken before it are stale to autograd, which then
        # refuses the second addition when ``patches`` requires grad (forward mode through the gather does so).
        _view(out, k, stride, (ho, wo)).add_(patches[:, :, :, k])
    return out


class _Patches(torch.autograd.Function):
    """``apply(x, stride, 0, 0)``: :func:`_gather`; ``apply(x, stride, height, width)``: :func:`_scatter` into padded
    sides ``(height, width)``. Two linear maps, each the other's adjoint, so that each one's derivative, of every
    order, is the other. ``generate_vmap_rule``: under ``vmap`` both run on the batched tensors as written. (The
    sides are two numbers, not a tuple: the generated rule would count a tuple's items as inputs.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, stride: int, height: int, width: int) -> Tensor:
        return _scatter(x, stride, (height, width)) if height else _gather(x, stride)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int, int, int], output: Tensor) -> None:
        x, ctx.stride, ctx.height, ctx.width = inputs
        ctx.padded = tuple(x.shape[1:3])  # (the gather's input sides: where its adjoint scatters to)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        into = (0, 0) if ctx.height else ctx.padded
        return _Patches.apply(grad, ctx.stride, *into), None, None, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, *_: None) -> Tensor:  # forward mode: the map is linear
        if ctx.height:
            return _scatter(tangent, ctx.stride, (ctx.height, ctx.width))
        return _gather(tangent, ctx.stride)


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
        downsample: str = "pool",
    ) -> None:
        super().__init__(in_channels, ways, hidden, image_size, bn, steps, products, downsample)
