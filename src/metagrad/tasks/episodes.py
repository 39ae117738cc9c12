"""N-way K-shot classification episodes from a labelled image set (Omniglot or any other), vectorised."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metagrad.tasks.base import TaskBatch

__all__ = ["EpisodeSampler"]


class EpisodeSampler:
    """Draws N-way classification tasks: a TaskDistribution over the classes of ``images``/``labels``.

    Each task takes ``ways`` distinct classes and, from each, ``shots + queries`` distinct images: the first
    ``shots`` go to the support set, the rest to the query set. The chosen classes get the labels 0..N-1 in a
    random order (a fresh assignment per task). With ``shuffle`` the support and query points are also put in
    a random order; otherwise they are grouped by label ([0]*K + [1]*K + ...).

    ``images`` [N_img, C, H, W] (float, or uint8 scaled by 1/255), ``labels`` [N_img] integer class ids;
    ``classes`` restricts sampling to those class ids (e.g. one split from ``split_classes``). Every random
    number comes from the generator passed to ``sample``; the tensors come out in the default dtype.

    ``mean``/``std`` (one value per channel, in [0, 1] units) normalise the images after scaling. ``augment``, a
    padding in pixels, turns on training augmentation: every support and query image is zero-padded by that much,
    randomly cropped back to its size and flipped horizontally with probability 1/2, vectorised over the batch
    and drawn from the same generator after the episode itself (so the same seed gives the same episodes).

    ``info`` of the returned batch holds ``classes`` [B, N] (the class id behind each label), and
    ``support_index`` [B, N*K] and ``query_index`` [B, N*Q] (rows of ``images``). Algorithms must not read it.
    """

    loss = "cross_entropy"

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        ways: int = 5,
        classes: Sequence[int] | Tensor | None = None,
        *,
        shuffle: bool = True,
        name: str = "omniglot",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: int | None = None,
    ) -> None:
        if images.dim() < 2 or images.shape[0] != labels.shape[0] or labels.dim() != 1:
            raise ValueError(
                "need images [N, ...] and labels [N] with the same N, "
                f"got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        self.images = images
        self.name = name
        channels = images.shape[1]
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None and (images.dim() != 4 or len(mean) != channels or len(std) != channels or min(std) <= 0):
            raise ValueError(
                f"mean and std need [N, C, H, W] images and C values each (std positive), got {list(mean)}, {list(std)}"
            )
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float64)
        if augment is not None and (int(augment) < 0 or images.dim() != 4):
            raise ValueError(f"augment is a padding >= 0 for [N, C, H, W] images, got {augment}")
        self.augment = None if augment is None else int(augment)
        self.shuffle = shuffle
        labels = labels.to(torch.int64).cpu()
        if classes is None:
            self.classes = torch.unique(labels)  # sorted
        else:
            self.classes = torch.unique(torch.as_tensor(classes, dtype=torch.int64).reshape(-1))
        if self.classes.numel() == 0:
            raise ValueError("no classes to sample from")
        # Table [C, M] of image rows per class (padded with -1) and counts [C]: sampling is then pure indexing.
        pos = torch.searchsorted(self.classes, labels).clamp(max=self.classes.numel() - 1)
        keep = self.classes[pos] == labels
        rows = torch.nonzero(keep).squeeze(1)
        cls = pos[keep]
        order = torch.argsort(cls, stable=True)
        rows, cls = rows[order], cls[order]
        self.counts = torch.bincount(cls, minlength=self.classes.numel())
        if int(self.counts.min()) == 0:
            missing = self.classes[self.counts == 0][:5].tolist()
            raise ValueError(f"classes without images: {missing}{' ...' if (self.counts == 0).sum() > 5 else ''}")
        starts = torch.cumsum(self.counts, 0) - self.counts
        self.table = torch.full((self.classes.numel(), int(self.counts.max())), -1, dtype=torch.int64)
        self.table[cls, torch.arange(cls.numel()) - starts[cls]] = rows
        self.ways = int(ways)
        if self.ways <= 0:
            raise ValueError(f"ways must be positive, got {ways}")
        if self.ways > self.num_classes:
            raise ValueError(f"ways={self.ways} exceeds the {self.num_classes} classes available")

    @property
    def num_classes(self) -> int:
        return int(self.classes.numel())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape [C, H, W], what a model is built for."""
        return tuple(self.images.shape[1:])

    @property
    def outputs(self) -> int:
        """One logit per way."""
        return self.ways

    @property
    def min_images_per_class(self) -> int:
        return int(self.counts.min())

    def sample(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` tasks of ``ways`` classes with ``shots`` support and ``queries`` query images each:
        support_x [B, N*K, C, H, W], support_y [B, N*K] (int64 in 0..N-1), query_x [B, N*Q, ...], query_y [B, N*Q]."""
        b, k, q, n = int(batch_size), int(shots), int(queries), self.ways
        if b <= 0 or k <= 0 or q <= 0:
            raise ValueError(f"batch size, shots and queries must be positive, got {batch_size}, {shots}, {queries}")
        if k + q > self.min_images_per_class:
            raise ValueError(
                f"shots + queries = {k + q} exceeds the {self.min_images_per_class} images of the smallest class; "
                "every task needs that many distinct images per class"
            )
        g = generator
        c, m = self.num_classes, self.table.shape[1]
        # N distinct classes per task in a random order: position i in the order is label i.
        chosen = torch.rand(b, c, generator=g).argsort(dim=1)[:, :n]  # [B, N] indices into self.classes
        # K+Q distinct images per class: the smallest of M random keys, padding slots pushed past every real one.
        keys = torch.rand(b, n, m, generator=g)
        keys = keys.masked_fill(torch.arange(m) >= self.counts[chosen][..., None], 2.0)
        pick = keys.argsort(dim=-1)[..., : k + q]  # [B, N, K+Q]
        rows = self.table[chosen[..., None], pick]  # [B, N, K+Q] rows of self.images
        s_rows = rows[..., :k].reshape(b, n * k)
        q_rows = rows[..., k:].reshape(b, n * q)
        s_y = torch.arange(n).repeat_interleave(k).expand(b, -1)
        q_y = torch.arange(n).repeat_interleave(q).expand(b, -1)
        if self.shuffle:
            sp = torch.rand(b, n * k, generator=g).argsort(dim=1)
            qp = torch.rand(b, n * q, generator=g).argsort(dim=1)
            s_rows, s_y = s_rows.gather(1, sp), s_y.gather(1, sp)
            q_rows, q_y = q_rows.gather(1, qp), q_y.gather(1, qp)
        info = {"classes": self.classes[chosen], "support_index": s_rows, "query_index": q_rows}
        s_x, q_x = self._gather(s_rows), self._gather(q_rows)
        if self.augment is not None:
            s_x, q_x = self._augment(s_x, g), self._augment(q_x, g)
        return TaskBatch(self._scale(s_x), s_y.contiguous(), self._scale(q_x), q_y.contiguous(), info)

    def _gather(self, rows: Tensor) -> Tensor:
        """The images at ``rows`` in the default dtype, not yet scaled (uint8 images stay in 0..255)."""
        return self.images[rows.to(self.images.device)].to(torch.get_default_dtype())

    def _scale(self, x: Tensor) -> Tensor:
        """uint8 images to [0, 1], then the normalisation, fused into one in-place multiply-add per element (the
        episode's cost is memory traffic: three passes with temporaries took three times as long)."""
        if self.mean is None:
            return x.div_(255) if self.images.dtype == torch.uint8 else x  # bit-identical to x / 255
        unit = 1 / 255 if self.images.dtype == torch.uint8 else 1.0
        scale, shift = unit / self.std, -self.mean / self.std
        shape = (-1, 1, 1)  # the channel axis of [..., C, H, W]
        return x.mul_(scale.to(x.device, x.dtype).reshape(shape)).add_(shift.to(x.device, x.dtype).reshape(shape))

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Random crop after zero padding and random horizontal flip of every image of [B, M, C, H, W]."""
        b, m, c, h, w = x.shape
        n, p = b * m, self.augment
        padded = torch.nn.functional.pad(x.reshape(n, c, h, w), (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n, 1), generator=g)
        ox = torch.randint(0, 2 * p + 1, (n, 1), generator=g)
        flip = torch.rand(n, 1, generator=g) < 0.5
        rows = oy + torch.arange(h)
        cols = ox + torch.arange(w)
        cols = torch.where(flip, cols.flip(1), cols)
        idx = torch.arange(n)[:, None, None].to(x.device)
        out = padded[idx, :, rows[:, :, None].to(x.device), cols[:, None, :].to(x.device)]  # [n, H, W, C]
        return out.permute(0, 3, 1, 2).reshape(b, m, c, h, w)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(name={self.name!r}, ways={self.ways}, classes={self.num_classes}, "
            f"images={self.images.shape[0]}, image_shape={tuple(self.images.shape[1:])})"
        )
