"""Shared helpers of the benchmark scripts: learners and batches of the MAML sinusoid protocol, machine info,
plain-text tables and JSON output. Not a benchmark itself; imported by ``throughput.py`` and ``memory.py``
(run them as ``python benchmarks/<script>.py`` so that this directory is on ``sys.path``)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from metagrad import (
    CAVIA,
    IMAML,
    MAML,
    MLP,
    ContextNetwork,
    MAMLEnhanced,
    MetaLearner,
    MetaSGD,
    Reptile,
    Sinusoid,
    TaskBatch,
)

__all__ = [
    "ALGORITHMS",
    "SHOTS",
    "QUERIES",
    "make_learner",
    "make_batch",
    "resolve_device",
    "synchronize",
    "all_threads",
    "machine_info",
    "load_average",
    "format_table",
    "write_json",
    "Column",
    "AutogradPatches",
]

# The MAML sinusoid protocol (Finn et al. 2017, section 5.1): K = 10 support and 10 query points per task.
SHOTS = 10
QUERIES = 10

_FACTORIES: dict[str, Callable[[int, bool], MetaLearner]] = {
    "reptile": lambda k, vec: Reptile(MLP(), inner_steps=k, inner_batch=10, vectorize=vec),
    "maml": lambda k, vec: MAML(MLP(), inner_lr=0.01, inner_steps=k, first_order=False, vectorize=vec),
    "fomaml": lambda k, vec: MAML(MLP(), inner_lr=0.01, inner_steps=k, first_order=True, vectorize=vec),
    "metasgd": lambda k, vec: MetaSGD(MLP(), inner_steps=k, vectorize=vec),
    "maml_enhanced": lambda k, vec: MAMLEnhanced(MLP(), inner_steps=k, vectorize=vec),
    # configs/sinusoid/cavia.toml: a 5-dimensional context concatenated to the input, inner lr 1.
    "cavia": lambda k, vec: CAVIA(ContextNetwork(MLP(), 5), inner_lr=1.0, inner_steps=k, vectorize=vec),
    # configs/sinusoid/imaml.toml: λ = 100, 5 CG steps, a backtracking inner line search of 4 halvings.
    "imaml": lambda k, vec: IMAML(MLP(), inner_lr=0.01, inner_steps=k, lam=100.0, cg_steps=5, line_search=4,
                                  vectorize=vec),  # fmt: skip
}
ALGORITHMS: tuple[str, ...] = tuple(_FACTORIES)


class AutogradPatches:
    """In place of ``metagrad.models.conv4._Patches`` (in a benchmark's own process): the blocks' gather and its
    scatter left to autograd, whose backward pass adds up nine zero-filled full-size gradients; what the
    written-out adjoint is worth."""

    @staticmethod
    def apply(x: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
        from metagrad.models.conv4 import _gather, _scatter

        return _scatter(x, stride, (height, width)) if height else _gather(x, stride)


def make_learner(algorithm: str, inner_steps: int, vectorize: bool = True, seed: int = 0) -> MetaLearner:
    """A fresh learner on the 1-40-40-1 ReLU MLP, on the CPU (move it with ``.to``)."""
    if algorithm not in _FACTORIES:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    torch.manual_seed(seed)
    return _FACTORIES[algorithm](int(inner_steps), vectorize)


def make_batch(meta_batch: int, device: torch.device | str = "cpu", seed: int = 0) -> TaskBatch:
    """``meta_batch`` sinusoid tasks with K = 10 support and 10 query points each."""
    return Sinusoid().sample(meta_batch, SHOTS, QUERIES, torch.Generator().manual_seed(seed)).to(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_threads() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to compare figures between machines."""
    import metagrad

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "metagrad": metagrad.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": all_threads(),
        "torch_default_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": _cpu_model(),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cuda_memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


Column = tuple[str, str, Callable[[Any], str]]  # (row key, header, formatter of a present, non-None value)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table (GitHub-flavoured Markdown); missing or None cells are blank."""
    header = [h for _, h, _ in columns]
    body = [[fmt(r[k]) if r.get(k) is not None else "" for k, _, fmt in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    # Numbers (optionally with a unit suffix such as "x") right-aligned, text left-aligned.
    right = [all(_numeric(b[i]) for b in body) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    rules = (("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right, strict=True))
    sep = "|" + "|".join(rules) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("x%*").replace(",", "") or "0")
    except ValueError:
        return False
    return True


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` (with the command line added) as indented JSON, creating parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], **payload}
    p.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
