"""What ``torch.func`` transforms are active around the running code, and which pass of the learner it is.

Some of PyTorch's kernels are wrong (batch norm) or unsupported (memory-format queries) under ``vmap`` but exact
and fastest everywhere else, so layers choose per call. A network may also choose its memory layout by the kind
of pass (:func:`in_inner_pass`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

__all__ = ["in_inner_pass", "inner_pass", "under_vmap"]

# Per thread and per asynchronous task, as a hint must not reach another thread's passes.
_INNER: contextvars.ContextVar[bool] = contextvars.ContextVar("metagrad_inner_pass", default=False)

_VMAP = torch._C._functorch.TransformType.Vmap


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active at any level (under ``torch.compile``: assumed, so that the traced
    graph holds the form that is right everywhere)."""
    if torch.compiler.is_compiling():
        return True
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == _VMAP for level in stack)


def inner_pass() -> contextlib.AbstractContextManager[None]:
    """Within the block the learner runs an inner-loop pass: a support-set forward pass whose gradient the inner
    step takes (and, second order, the meta-gradient differentiates again). Traced by ``torch.compile`` it sets
    nothing: compiled networks take one layout (see :func:`under_vmap`)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _hint()


@contextlib.contextmanager
def _hint() -> Iterator[None]:
    token = _INNER.set(True)
    try:
        yield
    finally:
        _INNER.reset(token)


def in_inner_pass() -> bool:
    """Whether the running forward pass is an inner-loop pass (:func:`inner_pass`). Conv-4 runs such passes in
    NCHW on the CPU and query passes channels-last, each the faster there."""
    return _INNER.get()
