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

__all__ = ["NamedTensors", "TensorView"]


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
