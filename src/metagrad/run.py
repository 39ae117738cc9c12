"""A run directory: ``run.json`` (marker, config and where its components come from), ``config.toml``,
``metrics.jsonl``, ``checkpoints/`` (see :mod:`metagrad.checkpoint`) and, optionally, ``tensorboard/``.

A run directory must be trusted like code: reading one (:func:`read_run_config`, :func:`load_learner`, hence
``metagrad eval``, ``plot``, ``adapt`` and ``train --resume``) imports the modules its ``run.json`` names under
``components`` (``module:qualname``), and importing a module runs it. Open only runs from a trusted source, as
with pickles and checkpoints. See docs/extending.md.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from metagrad import __version__
from metagrad.algorithms import MetaLearner
from metagrad.build import DTYPES, build_learner
from metagrad.checkpoint import (
    checkpoints,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_state,
    read_json,
    write_atomic,
)
from metagrad.config import COMPONENT_SECTIONS, Config, config_from_dict, config_to_toml
from metagrad.errors import CheckpointError, ConfigError, RunError

__all__ = [
    "RUN_FORMAT",
    "init_run",
    "init_run_record",
    "read_run_config",
    "load_learner",
    # re-exported from metagrad.checkpoint, where checkpoints are laid out
    "checkpoints",
    "latest_checkpoint",
    "load_state",
]

RUN_FORMAT = "metagrad-run/1"


def _is_run(path: Path) -> bool:
    return (path / "run.json").is_file()


def init_run(run_dir: Path, cfg: Config, overwrite: bool = False, kind: str = "train") -> None:
    """Create (or, with ``overwrite``, empty) a run directory. Refuses to clobber anything else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output path {str(run_dir)!r} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not _is_run(run_dir):
            raise RunError(
                f"output directory {str(run_dir)!r} is not empty and is not a metagrad run; choose another --out"
            )
        if not overwrite:
            raise RunError(
                f"output directory {str(run_dir)!r} already holds a run; pass --overwrite to replace it "
                "or --resume to continue it"
            )
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    init_run_record(run_dir, cfg, kind)


def init_run_record(run_dir: Path, cfg: Config, kind: str = "train") -> None:
    """Write (or rewrite, on resume) the run's ``run.json`` and ``config.toml``."""
    marker = {
        "format": RUN_FORMAT,
        "kind": kind,
        "version": __version__,
        "config": cfg.to_dict(),
        # Where each component is defined, so that the run loads again in a process that has not imported the
        # module that registered a component under a short name.
        "components": {k: _import_path(getattr(cfg, k).component.target) for k in COMPONENT_SECTIONS},
    }
    write_atomic(run_dir / "config.toml", config_to_toml(cfg))
    write_atomic(run_dir / "run.json", json.dumps(marker, indent=1))


def _import_path(target: object) -> str:
    return f"{target.__module__}:{target.__qualname__}"


def _import_components(marker: dict[str, Any]) -> None:
    """Import the modules that define the run's components by a name not registered in this process yet."""
    from metagrad.registry import registered

    paths = marker.get("components")
    if not isinstance(paths, dict):
        return  # a record written before components were recorded
    for kind in COMPONENT_SECTIONS:
        section = marker["config"].get(kind)
        name = section.get("name") if isinstance(section, dict) else None
        path = paths.get(kind)
        if not isinstance(name, str) or ":" in name or name in registered(kind) or not isinstance(path, str):
            continue
        module = path.partition(":")[0]
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - the user's module is gone or broken: say which
            raise RunError(
                f"{kind} {name!r} of this run was defined in {module!r}, which cannot be imported now "
                f"({type(e).__name__}: {e}); make it importable (e.g. on PYTHONPATH)"
            ) from None


def read_run_config(run_dir: str | Path) -> Config:
    """The config of an existing run; a clear error when the path is not a metagrad run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"run directory {str(run_dir)!r} does not exist")
    if not _is_run(run_dir):
        raise RunError(f"{str(run_dir)!r} is not a metagrad run (no run.json); pass the --out of a `metagrad train`")
    try:
        marker = read_json(run_dir / "run.json")
    except CheckpointError as e:
        raise RunError(str(e)) from None
    if marker.get("format") != RUN_FORMAT or not isinstance(marker.get("config"), dict):
        raise RunError(f"{run_dir / 'run.json'} is not a {RUN_FORMAT} file")
    _import_components(marker)
    try:
        return config_from_dict(marker["config"], strict=False).validate()  # older records hold more keys
    except ConfigError as e:
        raise RunError(f"{run_dir / 'run.json'} holds an invalid config: {e}") from None


def load_learner(
    run_dir: str | Path, which: str = "latest", device: torch.device | str = "cpu"
) -> tuple[Config, MetaLearner, dict[str, Any]]:
    """Rebuild a trained learner (with its learned rates and curvature) from a run directory."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    path = find_checkpoint(run_dir, which)  # latest, best, a checkpoint of this run by name, or a path
    weights, _, meta = load_checkpoint(path, weights_only=True)
    learner = build_learner(cfg)
    load_state(learner, weights, path)
    learner.to(device, DTYPES[cfg.train.dtype])
    return cfg, learner, meta
