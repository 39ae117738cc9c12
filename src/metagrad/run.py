"""A run directory: ``run.json`` (marker and config), ``config.toml``, ``metrics.jsonl``, ``checkpoints/``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from metagrad import __version__
from metagrad.algorithms import MetaLearner
from metagrad.build import DTYPES, build_learner
from metagrad.checkpoint import load_checkpoint, read_json, write_atomic
from metagrad.config import Config, config_from_dict, config_to_toml
from metagrad.errors import CheckpointError, ConfigError, RunError

__all__ = [
    "RUN_FORMAT",
    "init_run",
    "init_run_record",
    "read_run_config",
    "checkpoints",
    "latest_checkpoint",
    "load_learner",
]

RUN_FORMAT = "metagrad-run/1"
_ITER = re.compile(r"^iter-(\d{8})$")


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
    marker = {"format": RUN_FORMAT, "kind": kind, "version": __version__, "config": cfg.to_dict()}
    write_atomic(run_dir / "config.toml", config_to_toml(cfg))
    write_atomic(run_dir / "run.json", json.dumps(marker, indent=1))


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
    try:
        return config_from_dict(marker["config"], strict=False).validate()  # older records hold more keys
    except ConfigError as e:
        raise RunError(f"{run_dir / 'run.json'} holds an invalid config: {e}") from None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's periodic checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def load_state(learner: MetaLearner, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Put a checkpoint's tensors (``params.*``, ``meta.*``, ``extra.*``) into a learner built from the same
    config, keeping each tensor's device and dtype; a missing or misshapen tensor is a CheckpointError."""
    for group, tree in learner.state_tensors().items():
        for key in list(tree):
            name = f"{group}.{key}"
            if name not in weights:  # a checkpoint written under an older name of the same tensor
                name = f"{group}.{learner.legacy_names.get(key, key)}"
            if name not in weights or weights[name].shape != tree[key].shape:
                raise CheckpointError(
                    f"{path / 'weights.safetensors'} does not match this run's config (tensor {name!r})"
                )
            tree[key] = weights[name].to(tree[key].device, tree[key].dtype)


def load_learner(
    run_dir: str | Path, which: str = "latest", device: torch.device | str = "cpu"
) -> tuple[Config, MetaLearner, dict[str, Any]]:
    """Rebuild a trained learner (with its learned rates and curvature) from a run directory."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if which == "latest":
        path = latest_checkpoint(run_dir)
    elif which == "best":
        path = run_dir / "checkpoints" / "best"
        if not path.is_dir():  # killed between the two renames that replace it: the previous best is aside
            aside = sorted((run_dir / "checkpoints").glob(".best.old-*"))
            path = aside[-1] if aside else path
    else:  # a checkpoint of this run by name (iter-00070000), or a path
        path = run_dir / "checkpoints" / which if (run_dir / "checkpoints" / which).is_dir() else Path(which)
    if path is None or not path.is_dir():
        raise RunError(f"run {str(run_dir)!r} has no {which} checkpoint yet (train it first, or resume it)")
    weights, _, meta = load_checkpoint(path, weights_only=True)
    learner = build_learner(cfg)
    load_state(learner, weights, path)
    learner.to(device, DTYPES[cfg.train.dtype])
    return cfg, learner, meta
