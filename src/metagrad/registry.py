"""Registered components: task families, models and algorithms, each with its own config dataclass.

A component registers itself with a decorator, the shipped ones exactly as a user's::

    @dataclass
    class Wave2DConfig:
        shots: int = 10
        queries: int = 10

    @register_task("wave2d", config=Wave2DConfig)
    class Wave2D:
        def __init__(self, cfg: Wave2DConfig, split: str): ...
        def sample(self, batch_size, shots, queries, generator) -> TaskBatch: ...

A config names a component by its registered name (after the module that registers it was imported) or by
import path, ``task.name = "mypkg.tasks:Wave2D"``, which imports ``mypkg.tasks`` first.

What each kind is called with (a ``from_config`` classmethod if the object has one, else the object itself):

* task family: ``(options, split)`` -> an object with ``sample(batch_size, shots, queries, generator)`` and the
  attributes ``loss`` (``"mse"``, ``"cross_entropy"`` or a callable), ``input_shape`` (one point's input) and
  ``outputs`` (the size of the network's last dimension); optionally ``metric``. Its options need ``shots`` and
  ``queries``. ``split`` is ``"train"``, ``"val"`` or ``"test"``.
* model: ``(options, spec)`` -> an ``nn.Module``, with ``spec`` a :class:`TaskSpec` (shapes, inner steps).
* algorithm: ``(options, model, spec)`` -> a :class:`metagrad.MetaLearner`; ``MetaLearner.from_config``
  passes the options as keyword arguments, so a subclass with a config dataclass needs nothing more.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from metagrad.errors import ConfigError

__all__ = [
    "Component",
    "TaskSpec",
    "KINDS",
    "register_task",
    "register_model",
    "register_algorithm",
    "resolve",
    "registered",
]

KINDS = ("task", "model", "algorithm")
T = TypeVar("T")


@dataclass(frozen=True)
class Component:
    """A registered component: its kind, the name configs use, what builds it and its options dataclass."""

    kind: str
    name: str
    target: Any
    config: type

    def build(self, *args: Any) -> Any:
        factory = getattr(self.target, "from_config", None) or self.target
        return factory(*args)

    def options(self, **values: Any) -> Any:
        return self.config(**values)


@dataclass(frozen=True)
class TaskSpec:
    """What a model and an algorithm need to know of the task family (and of each other) to be built."""

    input_shape: tuple[int, ...]
    outputs: int
    loss: Any = "mse"
    metric: Any = None
    inner_steps: int = 0
    vectorize: bool | int | str = "auto"


_REGISTRY: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
_BY_TARGET: dict[int, Component] = {}


def _register(kind: str, name: str, config: type) -> Callable[[T], T]:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_{kind}({name!r}): config must be a dataclass type, got {config!r}")

    def decorate(target: T) -> T:
        component = Component(kind, name, target, config)
        _REGISTRY[kind][name] = component
        _BY_TARGET[id(target)] = component
        return target

    return decorate


def register_task(name: str, *, config: type) -> Callable[[T], T]:
    """Register a task family under ``name`` with its options dataclass (see the module docstring)."""
    return _register("task", name, config)


def register_model(name: str, *, config: type) -> Callable[[T], T]:
    """Register a model under ``name`` with its options dataclass."""
    return _register("model", name, config)


def register_algorithm(name: str, *, config: type) -> Callable[[T], T]:
    """Register an algorithm (a MetaLearner subclass or factory) under ``name`` with its options dataclass."""
    return _register("algorithm", name, config)


def _load_shipped() -> None:
    # Importing the packages runs the shipped components' decorators.
    import metagrad.algorithms  # noqa: F401
    import metagrad.models  # noqa: F401
    import metagrad.tasks  # noqa: F401


def registered(kind: str) -> dict[str, Component]:
    """The components of ``kind`` registered so far (the shipped ones always)."""
    _load_shipped()
    return dict(_REGISTRY[kind])


def resolve(kind: str, name: str) -> Component:
    """The component ``name`` of ``kind``: a registered name or ``"module.path:Attribute"``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    known = registered(kind)
    if name in known:
        return known[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{kind}.name = {name!r} is not a registered {kind}{hint}: choose from {', '.join(sorted(known))}, "
            f"or name your own as 'package.module:Class'"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise ConfigError(f"{kind}.name = {name!r} must look like 'package.module:Class' (an absolute module path)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{kind}.name = {name!r}: cannot import module {module_name!r} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while being imported
        failure = f"{type(e).__name__}: {e}"
        raise ConfigError(f"{kind}.name = {name!r}: importing {module_name!r} failed ({failure})") from None
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"{kind}.name = {name!r}: module {module_name!r} has no attribute {attr!r}")
    component = _BY_TARGET.get(id(target))
    if component is None or component.kind != kind:
        raise ConfigError(
            f"{kind}.name = {name!r} is not a registered {kind}: decorate it with "
            f"@metagrad.register_{kind}(name, config=YourConfig)"
        )
    return component
