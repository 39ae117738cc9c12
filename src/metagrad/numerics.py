"""Which float32 arithmetic the learner's GPU convolutions may use.

PyTorch lets cuDNN convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``, 10-bit mantissas),
which moves a Conv-4's second-order meta-gradient 200 times further from float64's than float32 does (5.2e-2
against 2.5e-4 relative on an H100, ``benchmarks/precision.py``). A :class:`metagrad.MetaLearner` therefore runs
its meta-steps, adaptation and evaluation with cuDNN's convolutions in full float32 unless its ``tf32``
attribute (``train.tf32``) allows TF32. Matrix products follow PyTorch's own setting, whose default is full
float32: a process that asked for TF32 matrix products (``torch.set_float32_matmul_precision("high")``) keeps
them. Everything outside the learner's calls keeps PyTorch's settings. Set it before the first compiled call: a
compiled step keeps the kernels it was compiled with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["tf32"]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Within the block, cuDNN convolutions may use TF32 if ``enabled``, and do not otherwise; the previous
    settings are restored on leaving, also after an exception.

    PyTorch 2.13 has two ways to say this, and code that reads one after the other was set can raise. The legacy
    flag (``cudnn.allow_tf32``) is what PyTorch and most code still read, so the block sets it, unless the
    process chose the newer API (``torch.backends.fp32_precision``), whose per-backend ``"none"`` would make the
    legacy flag inherit that choice: then it sets the convolutions' explicit ``fp32_precision`` instead."""
    cudnn = torch.backends.cudnn
    saved_flag = None
    if getattr(torch.backends, "fp32_precision", "none") == "none":  # PyTorch before 2.9 has only the flag
        try:
            saved_flag = cudnn.allow_tf32
        except RuntimeError:  # a mix of the two APIs that PyTorch refuses to read back
            saved_flag = None
    if saved_flag is not None:
        if saved_flag == enabled:
            yield
            return
        cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            cudnn.allow_tf32 = saved_flag
        return
    want, saved = ("tf32" if enabled else "ieee"), cudnn.conv.fp32_precision
    if saved == want:
        yield
        return
    # The getter reports an inherited value as its own: one equal to cuDNN's own setting goes back to inheriting
    # ("none"), so that a later change of the process's choice still reaches convolutions.
    restore = "none" if saved == cudnn.fp32_precision else saved
    cudnn.conv.fp32_precision = want
    try:
        yield
    finally:
        cudnn.conv.fp32_precision = restore
