"""What ``torch.func`` transforms are active around the running code, which pass of the learner it is, and
whether a derivative may be taken with ``torch.autograd`` instead.

Some of PyTorch's kernels are wrong (batch norm) or unsupported (memory-format queries) under ``vmap`` but exact
and fastest everywhere else, so layers choose per call. A network may also choose its memory layout by the kind
of pass (:func:`in_inner_pass`). The learner's eager task loop differentiates with ``torch.autograd`` where no
transform needs ``torch.func`` (:func:`plain_autograd`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

__all__ = ["in_inner_pass", "inner_pass", "plain_autograd", "transforms_only", "under_vmap"]

# Per thread and per asynchronous task, as a hint must not reach another thread's passes.
_INNER: contextvars.ContextVar[bool] = contextvars.ContextVar("metagrad_inner_pass", default=False)
_TRANSFORMS_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("metagrad_transforms_only", default=False)

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
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _on(_INNER)


@contextlib.contextmanager
def _on(flag: contextvars.ContextVar[bool]) -> Iterator[None]:
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def in_inner_pass() -> bool:
    """Whether the running forward pass is an inner-loop pass (:func:`inner_pass`). Conv-4 runs such passes in
    NCHW on the CPU and query passes channels-last, each the faster there."""
    return _INNER.get()


def plain_autograd() -> bool:
    """Whether a derivative here may be taken with ``torch.autograd`` rather than ``torch.func``: no transform is
    active, nothing is being traced by ``torch.compile`` (Dynamo traces ``torch.func``'s transforms, not
    ``torch.autograd.grad``), inference mode is off (no graph is recorded there) and no :func:`transforms_only`
    block is open. The same derivatives; ``torch.func`` wraps every operation and every custom autograd function at
    each transform level, which cost Conv-4's task loop 15-20 % at five inner steps."""
    if torch.compiler.is_compiling():  # first: Dynamo traces no context variable
        return False
    if _TRANSFORMS_ONLY.get() or torch.is_inference_mode_enabled():
        return False
    return not torch._C._functorch.get_interpreter_stack()


def transforms_only() -> contextlib.AbstractContextManager[None]:
    """Within the block derivatives are taken with ``torch.func`` also where :func:`plain_autograd` would allow
    ``torch.autograd``: a failing network is rerun so to be explained as ``torch.func`` meets it."""
    return _on(_TRANSFORMS_ONLY)
