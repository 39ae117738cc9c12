"""What ``torch.func`` transforms are active around the running code.

Some of PyTorch's kernels are wrong (batch norm) or unsupported (memory-format queries) under ``vmap`` but exact
and fastest everywhere else, so layers choose per call.
"""

from __future__ import annotations

import torch

__all__ = ["under_vmap"]

_VMAP = torch._C._functorch.TransformType.Vmap


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active at any level (under ``torch.compile``: assumed, so that the traced
    graph holds the form that is right everywhere)."""
    if torch.compiler.is_compiling():
        return True
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == _VMAP for level in stack)
