"""Which float32 arithmetic the learner's GPU kernels may use.

PyTorch lets cuDNN convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``, 10-bit mantissas),
which moves a Conv-4's second-order meta-gradient 200 times further from float64's than float32 does (5.2e-2
against 2.5e-4 relative on an H100, ``benchmarks/precision.py``). A :class:`metagrad.MetaLearner` therefore runs
its meta-steps, adaptation and evaluation in full float32 unless its ``tf32`` attribute (``train.tf32``) asks for
TF32; everything else in the process keeps PyTorch's settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["tf32"]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Within the block, cuDNN convolutions and CUDA matrix products may use TF32 if ``enabled``, and do not
    otherwise; the previous settings are restored on leaving, also after an exception."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
