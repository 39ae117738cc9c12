"""Checkpoints: the one place that knows their layout, files and names.

A checkpoint is a directory:

* ``weights.safetensors``: the learner's tensors, ``params.<name>`` (the network), ``meta.<name>`` (the inner
  rule's learned tensors) and ``extra.<name>`` (buffers and algorithm state such as Reptile's moments);
* ``trainer.safetensors``: ``optim.<index>.<key>`` (the meta-optimizer's tensors) and ``rng.tasks`` (the task
  stream's generator state);
* ``trainer.json``: iteration, seconds, best validation score, algorithm, config, how the update ran
  (``Trainer.update``: a CUDA graph, one compiled call or the separate parts), the optimizer's hyper-parameters
  and scalars, the learning-rate scheduler's ``state_dict``, and the SHA-256 of both tensor files.

It is written into a temporary directory, every file flushed and fsync'ed, then renamed into place, so a kill at
any moment leaves either the old checkpoint or the new one. Loading never unpickles anything. In a run directory
checkpoints live in ``checkpoints/``: ``iter-<8 digits>`` every ``train.checkpoint_every`` iterations (the last
``train.keep_last`` kept) and ``best`` (the best validation score so far).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from metagrad.errors import CheckpointError, RunError

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "write_atomic",
    "read_json",
    "learner_tensors",
    "load_state",
    "save_training_state",
    "restore_training_state",
    "checkpoint_name",
    "checkpoints",
    "latest_checkpoint",
    "find_checkpoint",
    "prune_checkpoints",
]

FORMAT = "metagrad-checkpoint/1"
WEIGHTS, TRAINER, META = "weights.safetensors", "trainer.safetensors", "trainer.json"
CHECKPOINTS, BEST = "checkpoints", "best"
_ITER = re.compile(r"^iter-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write(tmp, data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(
    directory: str | Path, weights: dict[str, Tensor], trainer: dict[str, Tensor], meta: dict[str, Any]
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one of the same name)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    blobs = {WEIGHTS: st_save(_contiguous(weights)), TRAINER: st_save(_contiguous(trainer))}
    for name, blob in blobs.items():
        _write(tmp / name, blob)
    meta = {**meta, "format": FORMAT, "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}}
    _write(tmp / META, json.dumps(meta, indent=1).encode())
    _fsync_dir(tmp)
    if directory.exists():
        # A directory cannot be renamed over a non-empty one: move the old aside first; a crash between
        # the two renames leaves it under the trash name, which load_checkpoint's callers still skip.
        trash = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, trash)
        os.replace(tmp, directory)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    return directory


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a metagrad file (expected a JSON object)")
    return data


def load_checkpoint(
    directory: str | Path, weights_only: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: (weights, trainer tensors, metadata). Raises CheckpointError."""
    directory = Path(directory)
    meta = read_json(directory / META)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META} is not a {FORMAT} file (format {meta.get('format')!r})")
    names = [WEIGHTS] if weights_only else [WEIGHTS, TRAINER]
    out = []
    for name in names:
        path = directory / name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256", {}).get(name):
            raise CheckpointError(f"{path} is truncated or corrupted (checksum mismatch)")
        try:
            out.append(st_load(blob))
        except (SafetensorError, ValueError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    return out[0], (out[1] if len(out) > 1 else {}), meta


# ----- what a checkpoint holds ----------------------------------------------------------------------------


def learner_tensors(learner: Any) -> dict[str, Tensor]:
    """The learner's tensors under their checkpoint names (``params.*``, ``meta.*``, ``extra.*``)."""
    return {f"{g}.{k}": v for g, tree in learner.state_tensors().items() for k, v in tree.items()}


def load_state(learner: Any, weights: dict[str, Tensor], path: Path) -> None:
    """Put a checkpoint's tensors (``params.*``, ``meta.*``, ``extra.*``) into a learner built from the same
    config, keeping each tensor's device and dtype; a missing or misshapen tensor is a CheckpointError."""
    for group, tree in learner.state_tensors().items():
        for key in list(tree):
            name = f"{group}.{key}"
            if name not in weights:  # a checkpoint written under an older name of the same tensor
                name = f"{group}.{learner.legacy_names.get(key, key)}"
            if name not in weights or weights[name].shape != tree[key].shape:
                raise CheckpointError(f"{Path(path) / WEIGHTS} does not match this run's config (tensor {name!r})")
            tree[key] = weights[name].to(tree[key].device, tree[key].dtype)


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    # Tensors go to safetensors, the rest (step counts kept as numbers, hyper-parameters) to JSON.
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = meta["param_groups"]
    if len(groups) == len(opt.param_groups):  # else torch's load_state_dict says what does not match
        # JSON wrote tuples (Adam's betas) as lists: give them back their type, as the optimizer holds them.
        groups = [
            {k: tuple(v) if isinstance(v, list) and isinstance(now.get(k), tuple) else v for k, v in saved.items()}
            for saved, now in zip(groups, opt.param_groups, strict=True)
        ]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(
    directory: str | Path,
    learner: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    info: dict[str, Any],
) -> Path:
    """Write everything an exact resume needs into a checkpoint directory (atomically); ``info`` (iteration,
    seconds, best_val, algorithm, config) goes to ``trainer.json`` as it is."""
    tensors, opt_meta = _optimizer_state(optimizer)
    tensors["rng.tasks"] = generator.get_state()
    meta = {**info, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
    return save_checkpoint(directory, learner_tensors(learner), tensors, meta)


def restore_training_state(
    directory: str | Path,
    learner: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_training_state` into the given objects; returns its metadata."""
    directory = Path(directory)
    weights, tensors, meta = load_checkpoint(directory)
    load_state(learner, weights, directory)
    try:
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
        generator.set_state(tensors["rng.tasks"])
        iteration = int(meta["iteration"])
        if "scheduler" in meta:
            scheduler.load_state_dict(meta["scheduler"])
        else:  # written before the schedule was a torch scheduler: it was a function of the iteration alone
            scheduler.last_epoch = iteration - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{directory} does not hold this run's trainer state ({type(e).__name__}: {e})") from None
    return meta


# ----- checkpoints in a run directory ---------------------------------------------------------------------


def checkpoint_name(iteration: int) -> str:
    """The name of the periodic checkpoint written after ``iteration`` iterations."""
    return f"iter-{iteration:08d}"


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The run's periodic checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's most recent periodic checkpoint, or None."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """``latest``, ``best``, a checkpoint of the run by name (``iter-00070000``) or a path; RunError if absent."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    path: Path | None
    if which == "latest":
        path = latest_checkpoint(run_dir)
    elif which == BEST:
        path = root / BEST
        if not path.is_dir():  # killed between the two renames that replace it: the previous best is aside
            aside = sorted(root.glob(f".{BEST}.old-*"))
            path = aside[-1] if aside else path
    else:
        path = root / which if (root / which).is_dir() else Path(which)
    if path is None or not path.is_dir():
        raise RunError(f"run {str(run_dir)!r} has no {which} checkpoint yet (train it first, or resume it)")
    return path


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` most recent periodic checkpoints (``best`` is never touched)."""
    for _, old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
