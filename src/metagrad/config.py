"""Typed run configuration: dataclasses <-> TOML, validation and ``section.key=value`` overrides.

Every section rejects unknown keys (suggesting the closest name) and wrong types, naming the key.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from metagrad.errors import ConfigError

__all__ = [
    "Config",
    "Section",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "raw_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_toml",
]

COMPONENT_SECTIONS = ("task", "model", "algorithm")


class UnknownKeyError(ConfigError, AttributeError):
    """A config key that the section (or its chosen component) does not have."""


class _Checked:
    """Dataclass mixin: assigning a key checks that it exists and its type (a typo raises at once)."""

    _section = ""

    def __setattr__(self, key: str, value: Any) -> None:
        hints = _hints(type(self))
        if key not in hints:
            raise UnknownKeyError(f"unknown key {self._section}.{key}{_suggest(key, hints)}")
        object.__setattr__(self, key, _check_type(f"{self._section}.{key}", value, hints[key]))


@dataclass
class TrainConfig(_Checked):
    _section = "train"
    iterations: int = 70000
    meta_batch: int = 25
    optimizer: str = "adam"
    meta_lr: float = 1e-3
    meta_state_lr: float | None = None
    lr_schedule: str = "constant"
    meta_lr_final: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 100
    val_every: int = 1000
    val_tasks: int = 100
    checkpoint_every: int = 1000
    keep_last: int = 3
    compile: bool = False
    # torch.compile's mode when compile is on: "reduce-overhead" captures the meta-step in CUDA graphs on a GPU
    # (no effect on the CPU), "max-autotune" also searches kernel configurations (slow to compile)
    compile_mode: str = "default"
    # With compile on the CPU: the norm, divergence guard, clipping and the Adam or SGD update run inside the
    # compiled meta-step, one call per iteration (metagrad.fused_update); false keeps them separate
    fused_update: bool = True
    # On a GPU: the fused update (compiled or not) is captured in a CUDA graph once and replayed every iteration,
    # one launch instead of hundreds (metagrad.cuda_graph); not with dropout, which a graph would replay unchanged
    cuda_graphs: bool = True
    # true: all tasks in one vmap; false: one task after another; k: vmap k tasks at a time; "auto": vmap
    # unless the network convolves (see MetaLearner.vmapped)
    vectorize: bool | int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    # Whether the GPU's cuDNN convolutions may use TF32 (PyTorch's default): faster, but a Conv-4 meta-gradient
    # moves 200 times further from float64's than in float32 (docs/results.md); matrix products follow PyTorch
    tf32: bool = False
    # Float32-precise batch statistics on the CPU for channels-last activations (Conv-4's query passes): a Conv-4
    # meta-gradient 2.5e-4 from float64 against 5.7e-4 with PyTorch's kernel (false: a little faster). Per-step
    # batch norm (model.bn = "per_step") computes its own statistics and is precise either way.
    precise_norms: bool = True
    threads: int = 0
    # On the CPU, the eager task loop runs whole tasks on this many threads at once, each task with one thread of
    # its own: "auto" (all of train.threads), k, or 1 (one task at a time, every thread on its operators). The
    # meta-gradient is the one-thread loop's to the bit; memory holds one task's graph per thread. Where tasks
    # would share something (a compiled step, dropout, hooks, ...) they stay one at a time (metagrad.task_threads)
    task_threads: int | str = "auto"
    # On the CPU, glibc's malloc keeps the memory it frees for the next iteration instead of returning it to the
    # system (metagrad.allocator, process-wide): a Conv-4 step no longer faults its memory in again every time
    keep_freed_memory: bool = True
    # Also write metrics.jsonl's records as TensorBoard scalars to RUN/tensorboard (extra: metagrad[tensorboard]).
    tensorboard: bool = False


@dataclass
class EvalConfig(_Checked):
    _section = "eval"
    shots: list[int] = field(default_factory=lambda: [5, 10, 20])
    steps: int = 10
    tasks: int = 600
    scoring: str = "dense"
    # Models with batch-norm running statistics: normalise query images with the "batch" statistics (MAML++,
    # transductive) or the "running" ones (inductive).
    bn_statistics: str = "batch"


class Section:
    """The ``[task]``, ``[model]`` or ``[algorithm]`` section: the chosen component's name and its options, an
    instance of the component's own config dataclass. Keys are read and set as attributes
    (``cfg.algorithm.inner_lr``); a key the component does not have, or a value of the wrong type, raises at
    once, naming the component. Setting ``name`` switches the component: keys both components have keep their
    value where it differs from the old component's default; the rest take the new component's defaults."""

    __slots__ = ("_kind", "_component", "_options", "_name_value")

    def __init__(self, kind: str, name: str, values: dict[str, Any] | None = None) -> None:
        from metagrad.registry import resolve

        component = resolve(kind, name)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_component", component)
        object.__setattr__(self, "_options", component.config())
        object.__setattr__(self, "_name_value", name)
        for key, value in (values or {}).items():
            setattr(self, key, value)

    @property
    def component(self) -> Any:
        """The registered component (see :mod:`metagrad.registry`)."""
        return self._component

    @property
    def options(self) -> Any:
        """The component's options (its config dataclass)."""
        return self._options

    @property
    def keys(self) -> list[str]:
        return [f.name for f in fields(self._options)]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        if key == "name":
            return object.__getattribute__(self, "_name_value")
        options = object.__getattribute__(self, "_options")
        names = _field_names(type(options))
        if key in names:
            return getattr(options, key)
        raise UnknownKeyError(f"{self._describe()} has no key {key!r}{_suggest(key, list(names))}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name":
            if not isinstance(value, str):
                raise ConfigError(f"{self._kind}.name must be a string, got {value!r}")
            self._switch(value)
            return
        hints = _hints(type(self._options))
        if key not in hints:
            raise UnknownKeyError(f"unknown key {self._kind}.{key} for {self._describe()}{_suggest(key, hints)}")
        setattr(self._options, key, _check_type(f"{self._kind}.{key}", value, hints[key]))

    def _describe(self) -> str:
        return f"{self._kind} {self.name!r}"

    def _switch(self, name: str) -> None:
        from metagrad.registry import resolve

        if name == self.name:
            return
        component = resolve(self._kind, name)
        old = dataclasses.asdict(self._options)
        defaults = dataclasses.asdict(self._component.config())
        options = component.config()
        hints = _hints(component.config)
        for key, value in old.items():  # keep what was set and both components have; the rest is the new defaults
            if key in hints and value != defaults.get(key):
                try:
                    setattr(options, key, _check_type(key, value, hints[key]))
                except ConfigError:
                    pass
        object.__setattr__(self, "_component", component)
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_name_value", name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self._options)}

    def __reduce__(self) -> tuple:
        return (_section_from, (self._kind, self.name, dataclasses.asdict(self._options)))

    def __copy__(self) -> Section:
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict) -> Section:
        new = object.__new__(Section)
        object.__setattr__(new, "_kind", self._kind)
        object.__setattr__(new, "_component", self._component)
        object.__setattr__(new, "_options", copy.deepcopy(self._options, memo))
        object.__setattr__(new, "_name_value", self.name)
        return new

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Section) and self._kind == other._kind and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self._options).items())
        return f"Section({self._kind}: {self.name!r}, {values})"


@functools.cache
def _field_names(options: type) -> tuple[str, ...]:
    # Read at every training step (cfg.task.shots): the dataclass's fields, found once per options class.
    return tuple(f.name for f in fields(options))


def _section_from(kind: str, name: str, values: dict[str, Any]) -> Section:
    return Section(kind, name, values)


@dataclass(slots=True)
class Config:
    task: Section = field(default_factory=lambda: Section("task", "sinusoid"))
    model: Section = field(default_factory=lambda: Section("model", "mlp"))
    algorithm: Section = field(default_factory=lambda: Section("algorithm", "maml"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k).to_dict() for k in COMPONENT_SECTIONS}
        out["train"] = asdict(self.train)
        out["eval"] = asdict(self.eval)
        return out


CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("task", "split"): ("character", "alphabet", "none"),
    ("model", "activation"): ("relu", "tanh", "gelu", "silu", "elu"),
    ("model", "bn"): ("transductive", "per_step"),
    ("model", "downsample"): ("pool", "stride"),
    ("algorithm", "rate_parameterization"): ("log", "raw"),
    ("algorithm", "lslr_beyond"): ("stop", "last"),
    ("algorithm", "inner_optimizer"): ("sgd", "adam"),
    ("train", "optimizer"): ("adam", "sgd"),
    ("train", "lr_schedule"): ("constant", "linear", "cosine"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "dtype"): ("float32", "float64"),
    ("eval", "scoring"): ("dense", "paper"),
    ("eval", "bn_statistics"): ("batch", "running"),
}
POSITIVE = {
    ("task", "shots"), ("task", "queries"), ("algorithm", "msl_epochs"), ("algorithm", "epoch_iterations"),
    ("algorithm", "inner_batch"), ("train", "iterations"), ("train", "meta_batch"), ("train", "log_every"),
    ("train", "val_every"), ("train", "val_tasks"), ("train", "checkpoint_every"), ("train", "keep_last"),
    ("eval", "steps"), ("eval", "tasks"), ("task", "ways"), ("task", "image_size"), ("model", "channels"),
}  # fmt: skip
NON_NEGATIVE = {("algorithm", "inner_steps"), ("algorithm", "first_order_iterations"), ("train", "threads")}
RATES = {
    ("algorithm", "inner_lr"), ("algorithm", "eval_inner_lr"), ("train", "meta_lr"),
    ("train", "meta_state_lr"), ("train", "meta_lr_final"), ("task", "noise"), ("train", "grad_clip"),
}  # fmt: skip
RANGES = {("task", "amplitude"), ("task", "phase"), ("task", "x_range")}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(cls).items() if not k.startswith("_")}


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _check_type(where, value, options[0])
        for inner in options:
            with contextlib.suppress(ConfigError):
                return _check_type(where, value, inner)
        kinds = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(a, str(a))
                            for a in options)  # fmt: skip
        raise ConfigError(f"{where} must be {kinds}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list of {item.__name__}, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")  # pragma: no cover


def config_from_dict(data: dict[str, Any], base: Config | None = None, strict: bool = True) -> Config:
    """Merge a nested dict (as read from TOML) into ``base`` (default: the defaults), checking every key against
    its section or, for ``[task]``, ``[model]`` and ``[algorithm]``, the chosen component's options.
    ``strict=False`` skips keys the component does not have (run records written by older versions)."""
    cfg = copy.deepcopy(base) if base is not None else Config()  # a rejected key leaves ``base`` untouched
    sections = [f.name for f in fields(Config)]
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]{_suggest(section, sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        obj = getattr(cfg, section)
        values = dict(values)
        if section in COMPONENT_SECTIONS and "name" in values:
            obj.name = values.pop("name")
        known = obj.keys if isinstance(obj, Section) else _hints(type(obj))
        legacy = getattr(obj.options, "legacy", None) if isinstance(obj, Section) else None
        if not strict and legacy is not None and any(k not in known for k in values):
            values = legacy(values)  # a record from when every section held every key: what it meant then
        for key, value in values.items():
            if not strict and key not in (obj.keys if isinstance(obj, Section) else _hints(type(obj))):
                continue
            setattr(obj, key, value)
    return cfg


def _validate(cfg: Config) -> None:
    def present(section: str, key: str) -> bool:
        obj = getattr(cfg, section)
        if isinstance(obj, Section):  # the tables hold the shipped components' rules; a user's has validate()
            return obj.component.target.__module__.startswith("metagrad.") and key in obj.keys
        return key in _hints(type(obj))

    def value(section: str, key: str) -> Any:
        return getattr(getattr(cfg, section), key)

    for (section, key), options in CHOICES.items():
        if present(section, key) and value(section, key) not in options:
            v = value(section, key)
            raise ConfigError(f"{section}.{key} = {v!r} is not one of {', '.join(options)}{_suggest(str(v), options)}")
    for section, key in POSITIVE:
        if present(section, key) and value(section, key) <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {value(section, key)}")
    for section, key in NON_NEGATIVE:
        if present(section, key) and value(section, key) < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {value(section, key)}")
    for section, key in RATES:
        v = value(section, key) if present(section, key) else None
        if v is not None and (not math.isfinite(v) or v < 0):
            raise ConfigError(f"{section}.{key} must be a finite number >= 0, got {v}")
    for section, key in RANGES:
        if not present(section, key):
            continue
        v = value(section, key)
        if len(v) != 2 or not all(math.isfinite(x) for x in v) or v[1] <= v[0]:
            raise ConfigError(f"{section}.{key} must be [low, high] with low < high, got {v}")
    if cfg.train.lr_schedule != "constant" and cfg.train.meta_lr == 0:
        raise ConfigError(
            f"train.lr_schedule = {cfg.train.lr_schedule!r} scales train.meta_lr, which is 0: set train.meta_lr > 0"
        )
    if not 0 <= cfg.train.seed < 10**9:
        raise ConfigError(f"train.seed must be in [0, 10**9) (larger seeds are reserved), got {cfg.train.seed}")
    if present("model", "hidden") and (not cfg.model.hidden or any(h <= 0 for h in cfg.model.hidden)):
        raise ConfigError(f"model.hidden must be a non-empty list of positive sizes, got {cfg.model.hidden}")
    if not cfg.eval.shots or any(s <= 0 for s in cfg.eval.shots):
        raise ConfigError(f"eval.shots must be a non-empty list of positive integers, got {cfg.eval.shots}")
    for section in COMPONENT_SECTIONS:  # a component's own rules, in its config dataclass
        check = getattr(getattr(cfg, section).options, "validate", None)
        if check is not None:
            check(cfg)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file at ``path``, then ``section.key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        cfg = config_from_dict(data, cfg)
    return apply_overrides(cfg, overrides).validate()


def raw_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """What a config file and overrides set, as a nested dict (only those keys, not the defaults), after checking
    that they make a valid config. ``metagrad compare --config`` gives it to each algorithm in turn."""
    load_config(path, overrides)  # every key and value checked
    data: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8")) if path is not None else {}
    for item in overrides:
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        data.setdefault(section, {})[key] = _parse_value(text.strip())
    return data


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: algorithm.name=maml


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (values in TOML syntax; bare words are strings)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.iterations=1000")
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        cfg = config_from_dict({section: {key: _parse_value(text.strip())}}, cfg)
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def config_to_toml(cfg: Config) -> str:
    """The configuration as TOML (keys whose value is None are left out: TOML has no null)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
