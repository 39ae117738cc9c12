"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019) and most few-shot work since, with optional DropBlock.

Four residual blocks of widths 64-160-320-640 (``widths``). Each block: three 3x3 convolutions, each followed by
batch norm, with LeakyReLU(0.1) after the first two; a 1x1 convolution + batch norm shortcut; the sum through
LeakyReLU, then 2x2 max-pooling. DropBlock (Ghiasi et al. 2018) follows the pooling of the last two blocks when
``dropblock > 0``, as in MetaOptNet. Global average pooling and a linear head give the ``ways`` logits.

Every batch norm is :class:`metagrad.models.norm.BatchNorm2d` (exact under vmap of grad of grad). By default it
has no running statistics: each task's support and query batches are normalised with their own statistics, as
Conv-4 in MAML. ``running_statistics=True`` gives it running statistics, which the learner tracks outside the
transforms and uses as it does for any network (``MetaLearner.query_statistics``).

DropBlock draws its masks with ``torch.rand``; it is marked ``stochastic`` so that the learner gives every task its
own masks under ``vmap`` from the trainer's generator, and is off outside training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.models.norm import BatchNorm2d
from metagrad.registry import register_model

__all__ = ["ResNet12", "ResNet12Config", "DropBlock", "ResidualBlock"]


class DropBlock(nn.Module):
    """Drops ``block_size`` x ``block_size`` squares of each feature map with probability ``p`` per unit (in
    training only), rescaling what is kept so that the expected activation is unchanged."""

    stochastic = True  # the learner draws per-task randomness for it under vmap

    def __init__(self, p: float, block_size: int = 5) -> None:
        super().__init__()
        if not 0 <= p < 1 or block_size < 1:
            raise ValueError(f"DropBlock needs 0 <= p < 1 and block_size >= 1, got {p}, {block_size}")
        self.p, self.block_size = float(p), int(block_size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        n, c, h, w = x.shape
        bs = min(self.block_size, h, w)
        # Seed rate so that a fraction ~p of the units is dropped once seeds grow into blocks (Ghiasi et al., eq. 1).
        gamma = self.p / bs**2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
        seeds = (torch.rand(n, c, h - bs + 1, w - bs + 1, device=x.device) < gamma).to(x.dtype)
        # A seed at (i, j) drops [i, i + bs) x [j, j + bs): max-pool the seeds padded by bs - 1 on every side.
        blocks = F.max_pool2d(F.pad(seeds, (bs - 1,) * 4), bs, stride=1)
        keep = 1 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}"


class ResidualBlock(nn.Module):
    """conv-BN-LeakyReLU, conv-BN-LeakyReLU, conv-BN, plus a 1x1 conv-BN shortcut; LeakyReLU, 2x2 max-pool."""

    def __init__(
        self, cin: int, cout: int, slope: float = 0.1, running_statistics: bool = False, drop: DropBlock | None = None
    ) -> None:
        super().__init__()

        def norm() -> BatchNorm2d:
            return BatchNorm2d(cout, track_running_stats=running_statistics)

        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm()
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm()
        self.shortcut, self.bn_shortcut = nn.Conv2d(cin, cout, 1, bias=False), norm()
        self.slope = float(slope)
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = F.leaky_relu(self.bn2(self.conv2(out)), self.slope)
        out = self.bn3(self.conv3(out)) + self.bn_shortcut(self.shortcut(x))
        return self.drop(F.max_pool2d(F.leaky_relu(out, self.slope), 2))


@dataclass
class ResNet12Config:
    """``[model]`` options of ResNet-12 (``name = "resnet12"``): block widths, DropBlock's drop probability in the
    last two blocks (0: off) and block size, the LeakyReLU slope, and whether batch norms keep running
    statistics (default: none, every batch normalised with its own, as MAML)."""

    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    dropblock: float = 0.0
    dropblock_size: int = 5
    slope: float = 0.1
    running_statistics: bool = False


@register_model("resnet12", config=ResNet12Config)
class ResNet12(nn.Module):
    """``ResNet12(in_channels=3, ways=5, widths=(64, 160, 320, 640), dropblock=0.0, dropblock_size=5, slope=0.1,
    running_statistics=False)``: [N, in_channels, H, W] -> [N, ways] logits (H, W >= 16: four 2x2 poolings)."""

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 5,
        widths: Sequence[int] = (64, 160, 320, 640),
        dropblock: float = 0.0,
        dropblock_size: int = 5,
        slope: float = 0.1,
        running_statistics: bool = False,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) <= 0 or in_channels <= 0 or ways <= 0:
            raise ValueError(f"ResNet-12 needs four positive widths and positive in_channels/ways, got {widths}")
        self.in_channels, self.ways = int(in_channels), int(ways)
        blocks, cin = [], self.in_channels
        for i, w in enumerate(widths):
            drop = DropBlock(dropblock, dropblock_size) if dropblock > 0 and i >= 2 else None
            blocks.append(ResidualBlock(cin, w, slope, running_statistics, drop))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, self.ways)

    @classmethod
    def from_config(cls, options: ResNet12Config, spec: Any) -> ResNet12:
        """Built for the task's images ``[C, H, W]`` and its number of ways."""
        from metagrad.errors import ConfigError

        shape = tuple(spec.input_shape)
        if len(shape) != 3 or min(shape[1:]) < 16:
            raise ConfigError(f"model resnet12 needs images [C, H, W] with H, W >= 16; the task gives {shape}")
        if not 0 <= options.dropblock < 1:
            raise ConfigError(f"model.dropblock = {options.dropblock} must be a probability in [0, 1)")
        if len(options.widths) != 4 or min(options.widths) <= 0:
            raise ConfigError(f"model.widths = {options.widths} must be four positive widths (64, 160, 320, 640)")
        return cls(
            shape[0], spec.outputs, options.widths, options.dropblock, options.dropblock_size, options.slope,
            options.running_statistics,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"ResNet12 expects [N, C, H, W] images, got shape {tuple(x.shape)}")
        # A mean, not adaptive_avg_pool2d: that has no vmap batching rule (torch 2.13 falls back to a slow loop).
        return self.head(self.blocks(x).mean(dim=(2, 3)))
