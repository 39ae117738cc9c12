"""Typed run configuration: dataclasses <-> TOML, validation and ``section.key=value`` overrides.

Every section rejects unknown keys (suggesting the closest name) and wrong types, naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
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
    "TaskConfig",
    "ModelConfig",
    "AlgorithmConfig",
    "TrainConfig",
    "EvalConfig",
    "ALGORITHMS",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_toml",
]

ALGORITHMS = ("maml", "fomaml", "metasgd", "maml_enhanced", "reptile", "pretrain", "oracle")


@dataclass
class TaskConfig:
    name: str = "sinusoid"
    shots: int = 10
    queries: int = 10
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    noise: float = 0.0
    # Few-shot classification (task.name = "omniglot"): shots and queries are per class.
    ways: int = 5
    data: str = "../shared/data/omniglot"
    split: str = "character"
    rotations: bool = True
    image_size: int = 28


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"
    channels: int = 64
    # Conv-4 batch norm: "transductive" (MAML) or "per_step" (MAML++: per-step affine weights and running stats).
    bn: str = "transductive"


@dataclass
class AlgorithmConfig:
    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    eval_inner_lr: float | None = None
    first_order: bool = False
    anil: bool = False
    # Learned inner rules (MAML Enhanced / Meta-SGD).
    lslr: bool = False
    per_layer_lr: bool = False
    curvature: bool = False
    rate_parameterization: str = "log"
    lslr_beyond: str = "stop"
    # MAML++ training.
    multi_step_loss: bool = False
    msl_epochs: int = 10
    epoch_iterations: int = 500
    first_order_iterations: int = 0
    # Reptile.
    inner_batch: int = 10
    inner_optimizer: str = "sgd"
    persist_inner_state: bool = True


@dataclass
class TrainConfig:
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
    vectorize: bool = True
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0


@dataclass
class EvalConfig:
    shots: list[int] = field(default_factory=lambda: [5, 10, 20])
    steps: int = 10
    tasks: int = 600
    scoring: str = "dense"
    # Per-step batch norm only: normalise with the "batch" statistics (MAML++) or the learned "running" ones.
    bn_statistics: str = "batch"


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("task", "name"): ("sinusoid", "omniglot"),
    ("task", "split"): ("character", "alphabet", "none"),
    ("model", "name"): ("mlp", "conv4"),
    ("model", "activation"): ("relu", "tanh", "gelu", "silu", "elu"),
    ("model", "bn"): ("transductive", "per_step"),
    ("algorithm", "name"): ALGORITHMS,
    ("algorithm", "rate_parameterization"): ("log", "raw"),
    ("algorithm", "lslr_beyond"): ("stop", "last"),
    ("algorithm", "inner_optimizer"): ("sgd", "adam"),
    ("train", "optimizer"): ("adam", "sgd"),
    ("train", "lr_schedule"): ("constant", "linear", "cosine"),
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


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        return _check_type(where, value, inner)
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


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Merge a nested dict (as read from TOML) into ``base`` (default: the defaults), checking every key."""
    cfg = copy.deepcopy(base) if base is not None else Config()  # a rejected key leaves ``base`` untouched
    sections = {f.name: f for f in fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]{_suggest(section, sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown key {section}.{key}{_suggest(key, hints)}")
            setattr(obj, key, _check_type(f"{section}.{key}", value, hints[key]))
    return cfg


def _validate(cfg: Config) -> None:
    for (section, key), options in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            raise ConfigError(
                f"{section}.{key} = {value!r} is not one of {', '.join(options)}{_suggest(str(value), options)}"
            )
    for section, key in POSITIVE:
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {value}")
    for section, key in NON_NEGATIVE:
        value = getattr(getattr(cfg, section), key)
        if value < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {value}")
    for section, key in RATES:
        value = getattr(getattr(cfg, section), key)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"{section}.{key} must be a finite number >= 0, got {value}")
    for section, key in RANGES:
        value = getattr(getattr(cfg, section), key)
        if len(value) != 2 or not all(math.isfinite(v) for v in value) or value[1] <= value[0]:
            raise ConfigError(f"{section}.{key} must be [low, high] with low < high, got {value}")
    if not 0 <= cfg.train.seed < 10**9:
        raise ConfigError(f"train.seed must be in [0, 10**9) (larger seeds are reserved), got {cfg.train.seed}")
    if not cfg.model.hidden or any(h <= 0 for h in cfg.model.hidden):
        raise ConfigError(f"model.hidden must be a non-empty list of positive sizes, got {cfg.model.hidden}")
    if not cfg.eval.shots or any(s <= 0 for s in cfg.eval.shots):
        raise ConfigError(f"eval.shots must be a non-empty list of positive integers, got {cfg.eval.shots}")
    expected_model = {"sinusoid": "mlp", "omniglot": "conv4"}[cfg.task.name]
    if cfg.model.name != expected_model:
        raise ConfigError(f"task {cfg.task.name!r} needs model.name = {expected_model!r}, got {cfg.model.name!r}")
    if cfg.task.name == "omniglot" and cfg.algorithm.name == "oracle":
        raise ConfigError("the oracle baseline exists for the sinusoid task only")
    alg = cfg.algorithm
    if cfg.model.bn == "per_step":
        if cfg.model.name != "conv4":
            raise ConfigError("model.bn = 'per_step' is a Conv-4 option (task.name = 'omniglot')")
        if alg.name not in ("maml", "fomaml", "metasgd", "maml_enhanced"):
            raise ConfigError(
                f"model.bn = 'per_step' indexes batch norm by MAML's inner step; {alg.name} has none: use "
                "model.bn = 'transductive'"
            )
    elif cfg.eval.bn_statistics == "running":
        raise ConfigError("eval.bn_statistics = 'running' needs model.bn = 'per_step' (transductive BN has none)")
    if alg.anil and alg.name == "reptile":
        raise ConfigError("algorithm.anil is not available for reptile (it adapts every weight)")
    if alg.name in ("maml_enhanced",) and alg.inner_steps == 0:
        raise ConfigError("algorithm.inner_steps must be positive for maml_enhanced (it learns per-step rates)")
    if alg.name == "reptile" and alg.inner_steps == 0:
        raise ConfigError("algorithm.inner_steps must be positive for reptile")
    if (alg.lslr or alg.curvature) and alg.inner_steps == 0:
        raise ConfigError("algorithm.inner_steps must be positive when lslr or curvature is on")
    if alg.lslr or alg.name in ("maml_enhanced", "metasgd"):
        if alg.inner_lr <= 0:
            raise ConfigError("algorithm.inner_lr must be > 0 for learned rates (they start at it)")


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
    for f in fields(cfg):
        lines.append(f"[{f.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, f.name)).items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
