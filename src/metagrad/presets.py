"""The shipped configurations, read from the TOML files in ``configs/``: nothing here repeats them.

``configs/<task>/<name>.toml`` is the preset ``name`` of the benchmark ``task`` (the published protocol, e.g.
70,000 sinusoid meta-iterations), exactly what ``metagrad train --config`` reads. ``configs/<task>/benchmark.toml``
lists the algorithms ``metagrad compare`` runs by default and the budgets: keys set on top of a preset
(``default`` is compare's short budget, ``tiny`` is for tests and notebooks, ``paper`` changes nothing). A new
benchmark is a new folder.

The folder is found inside the installed package (``metagrad/configs``, copied there by ``setup.py`` when a wheel
is built) or, in a source checkout (an editable install, or ``src`` on ``PYTHONPATH``), at the repository root.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from metagrad.config import Config, _suggest, config_from_dict, load_config
from metagrad.errors import ConfigError

__all__ = ["DEFAULT_TASK", "configs_dir", "tasks", "presets", "budgets", "compare_algorithms", "preset"]

DEFAULT_TASK = "sinusoid"
BENCHMARK = "benchmark.toml"


def configs_dir() -> Path:
    """The folder of shipped configs (one sub-folder per benchmark)."""
    here = Path(__file__).resolve().parent
    for path in (here / "configs", here.parents[1] / "configs"):  # installed wheel, then source checkout
        if (path / DEFAULT_TASK / BENCHMARK).is_file():
            return path
    raise ConfigError(
        f"metagrad's shipped configs are missing (looked in {here / 'configs'} and {here.parents[1] / 'configs'}); "
        "reinstall metagrad (pip install metagrad, or pip install -e . in a checkout)"
    )


def tasks() -> tuple[str, ...]:
    """The shipped benchmarks (``sinusoid``, ``omniglot``, ...)."""
    return tuple(sorted(p.name for p in configs_dir().iterdir() if (p / BENCHMARK).is_file()))


def _task_dir(task: str) -> Path:
    known = tasks()
    if task not in known:
        raise ConfigError(f"unknown task {task!r}{_suggest(task, known)}; choose from {', '.join(known)}")
    return configs_dir() / task


def _benchmark(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"shipped benchmark file {path} cannot be read: {e}") from None


def presets(task: str = DEFAULT_TASK) -> dict[str, Path]:
    """The presets of ``task``: name -> TOML file."""
    return {p.stem: p for p in sorted(_task_dir(task).glob("*.toml")) if p.name != BENCHMARK}


def budgets(task: str = DEFAULT_TASK) -> dict[str, dict[str, Any]]:
    """The budgets of ``task``: name -> the config keys it sets (``paper`` sets none)."""
    table = dict(_benchmark(_task_dir(task) / BENCHMARK).get("budgets", {}))
    table.setdefault("paper", {})
    # A budget given as another budget's name (omniglot: default = "cpu") means the same keys.
    return {name: table[value] if isinstance(value, str) else value for name, value in table.items()}


def compare_algorithms(task: str = DEFAULT_TASK) -> tuple[str, ...]:
    """The algorithms ``metagrad compare --task task`` runs by default, in order."""
    return tuple(_benchmark(_task_dir(task) / BENCHMARK).get("compare", ()))


def preset(algorithm: str, budget: str = "paper", task: str = DEFAULT_TASK) -> Config:
    """The shipped configuration of ``algorithm`` for ``task`` under ``budget``."""
    files = presets(task)
    if algorithm not in files:
        raise ConfigError(
            f"unknown algorithm {algorithm!r} for {task}{_suggest(algorithm, files)}; choose from {', '.join(files)}"
        )
    table = budgets(task)
    if budget not in table:
        raise ConfigError(f"unknown budget {budget!r}{_suggest(budget, table)}; choose from {', '.join(table)}")
    try:
        cfg = load_config(files[algorithm])
    except ConfigError as e:
        raise ConfigError(f"shipped preset {files[algorithm]}: {e}") from None
    try:
        return config_from_dict(table[budget], cfg).validate()
    except ConfigError as e:
        raise ConfigError(f"budget {budget!r} of {files[algorithm].parent / BENCHMARK}: {e}") from None


def __getattr__(name: str) -> Any:
    # Kept for callers of the old module: the default benchmark's compare list, read from its benchmark.toml.
    if name == "COMPARE_ALGORITHMS":
        return compare_algorithms(DEFAULT_TASK)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
