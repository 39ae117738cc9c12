"""Tensors under dotted names (``"curvature.convs.0.weight.out"``), held by a module as parameters or buffers.

``nn.Module`` attribute names cannot contain dots, and a learner's learned rule tensors and extra state are named
after the network's parameters. :class:`NamedTensors` stores them with ``/`` for ``.`` so that ``parameters()``,
``state_dict()``, ``.to()`` and optimizers treat them like the network's own; :class:`TensorView` is the live,
dotted-name mapping the functional core reads, whose assignment copies in place (an optimizer that holds the
tensor keeps working).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping

import torch
from torch import Tensor, nn

__all__ = ["NamedTensors", "ParameterIndex", "TensorView"]


class TensorView(MutableMapping[str, Tensor]):
    """A live mapping ``name -> tensor`` over tensors owned elsewhere; ``view[k] = v`` copies ``v`` in place."""

    def __init__(self, items: Callable[[], Mapping[str, Tensor]]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Tensor:
        return self._items()[key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        target = self._items()[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: cannot assign a tensor of shape {tuple(value.shape)} to {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("the learner's tensors cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    # One walk of the owner's tensors, not one per key (the training loop reads these every iteration).
    def items(self):  # type: ignore[override]
        return self._items().items()

    def values(self):  # type: ignore[override]
        return self._items().values()

    def keys(self):  # type: ignore[override]
        return self._items().keys()

    def __contains__(self, key: object) -> bool:
        return key in self._items()

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"TensorView({sorted(self._items())})"


def _escape(name: str) -> str:
    return name.replace(".", "/")


def _unescape(name: str) -> str:
    return name.replace("/", ".")


class NamedTensors(nn.Module):
    """Tensors with dotted names, registered as parameters (``learned=True``) or buffers."""

    def __init__(self, tensors: Mapping[str, Tensor] | None = None, learned: bool = True) -> None:
        super().__init__()
        self.learned = learned
        for name, value in (tensors or {}).items():
            self.add(name, value)

    def add(self, name: str, value: Tensor) -> None:
        if self.learned:
            self.register_parameter(_escape(name), nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer(_escape(name), value.detach().clone())

    def tensors(self) -> dict[str, Tensor]:
        found = self.named_parameters(recurse=False) if self.learned else self.named_buffers(recurse=False)
        return {_unescape(n): t for n, t in found}

    def view(self) -> TensorView:
        return TensorView(self.tensors)

    def extra_repr(self) -> str:
        return f"{len(self.tensors())} {'learned tensors' if self.learned else 'buffers'}"


class ParameterIndex:
    """``dict(module.named_parameters())``, rebuilt only when the module's structure changes.

    ``named_parameters`` walks every submodule, generators and name strings included, and a meta-step reads the
    parameters several times: on a small network that walk costs as much as a few percent of a compiled step.
    Every read checks, by identity, that each submodule still holds the parameter and child objects it held when
    the index was built, under the same names, so a parameter or submodule that is added, replaced, renamed or
    deleted anywhere (``setattr``, ``del``, ``load_state_dict(assign=True)``, parametrizations) rebuilds it.
    In-place changes (``.to()``, an optimizer step, ``requires_grad_``) keep the same objects and need no rebuild."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._named: dict[str, nn.Parameter] = {}
        self._modules: list[nn.Module] = []
        self._signature: list[tuple[str, int]] | None = None

    def _current(self) -> list[tuple[str, int]]:
        # Names and identities (a rename keeps the objects): the index holds every object it lists, so their ids
        # cannot be reused while it lives.
        return [(k, id(v)) for m in self._modules for d in (m._parameters, m._modules) for k, v in d.items()]

    def __call__(self) -> dict[str, nn.Parameter]:
        """The parameters by name (the cached dict itself: do not mutate it)."""
        if self._signature is None or self._current() != self._signature:
            self._named = dict(self.module.named_parameters())
            self._modules = list(self.module.modules())
            self._signature = self._current()
        return self._named
