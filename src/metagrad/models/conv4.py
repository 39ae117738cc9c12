"""The Conv-4 network of the few-shot image classification literature (Vinyals et al. 2016; MAML; Reptile).

Four blocks of 3x3 convolution (``hidden`` filters, padding 1), BatchNorm, ReLU and 2x2 max-pooling, then a
linear head to ``ways`` logits. For 28x28 Omniglot the feature map ends at 1x1, so the head sees ``hidden``
features (the MAML code's Omniglot variant uses strided convolutions instead of pooling; this is the
pooling variant of Vinyals et al., Snell et al. and MAML's MiniImagenet network).

BatchNorm uses *transductive batch statistics*: ``nn.BatchNorm2d(track_running_stats=False)`` has no
buffers, normalises every forward pass with the statistics of the batch it is given, in training and in
evaluation alike, and learns only its affine scale and shift. Under ``torch.func.functional_call`` + ``vmap``
each task is normalised with its own support (or query) statistics, nothing leaks from one task to another,
and second-order gradients flow through the normalisation. This is MAML's choice. MAML++'s per-step
running statistics (Antoniou et al. 2019, "BNRS") and per-step affine parameters ("BNWB") are not
implemented yet. A consequence: predictions depend on the whole query set passed together, as in MAML.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Conv4"]


class Conv4(nn.Module):
    """``Conv4(in_channels=1, ways=5, hidden=64, image_size=28)``: [N, in_channels, S, S] -> [N, ways] logits.

    Used through ``torch.func.functional_call``; it has no buffers (see the module docstring on BatchNorm).
    """

    def __init__(self, in_channels: int = 1, ways: int = 5, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        if min(int(in_channels), int(ways), int(hidden), int(image_size)) <= 0:
            raise ValueError(
                f"in_channels, ways, hidden and image_size must be positive, got {in_channels}, {ways}, {hidden}, "
                f"{image_size}"
            )
        side = int(image_size)
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for four 2x2 poolings, got {image_size}")
        self.in_channels, self.ways = int(in_channels), int(ways)
        self.hidden, self.image_size = int(hidden), int(image_size)
        blocks: list[nn.Module] = []
        channels = self.in_channels
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, self.hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(self.hidden, affine=True, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = self.hidden
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(self.hidden * side * side, self.ways)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Conv4 expects [N, C, H, W] images, got shape {tuple(x.shape)}")
        return self.head(self.features(x).flatten(1))
