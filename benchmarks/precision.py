"""How far reduced precision moves the meta-gradient: float32, bfloat16/float16 autocast and TF32, each against the
same meta-gradient in float64 on the CPU.

Run from the repository root::

    python benchmarks/precision.py                                  # CPU: float32 (also with imprecise
                                                                    # norms) and bfloat16 autocast
    python benchmarks/precision.py --device cuda --json out.json    # also TF32 and float16 autocast

Protocol: Omniglot 5-way 1-shot episodes (15 queries per class) from ``--data`` when it is there,
standard-normal 28x28 images otherwise; Conv-4 (``--channels`` filters, transductive batch norm), MAML second
order and first order, ``--steps`` inner steps at lr 0.4, meta-batch ``--meta-batch``; and the sinusoid MLP (MAML,
1 step). One initialisation, one batch, so every mode sees the same problem.

Columns: ``rel_error`` is ``‖g − g64‖ / ‖g64‖`` over all parameters at once, ``worst_tensor`` the largest such
ratio of one tensor (the convolution biases, whose exact gradient under batch norm is 0, are left out),
``cosine`` the cosine similarity of the whole gradient with float64's. metagrad's own tests hold float32 paths to
about 1e-6 of float64; a mode whose ``rel_error`` is above 1e-2 changes the meta-gradient's direction materially.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from _common import format_table, machine_info, resolve_device, write_json

from metagrad import MAML, MLP, Sinusoid, TaskBatch
from metagrad.models import Conv4

OMNIGLOT = Path(os.environ.get("OMNIGLOT", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"))


def omniglot_batch(
    meta_batch: int, ways: int, shots: int, queries: int, root: Path = OMNIGLOT
) -> tuple[TaskBatch, str]:
    g = torch.Generator().manual_seed(0)
    if root.is_dir():
        from metagrad.build import build_task
        from metagrad.presets import preset

        cfg = preset("maml", "cpu", "omniglot")
        cfg.task.data = str(root)
        return build_task(cfg, "train").sample(meta_batch, shots, queries, g), "omniglot"
    x = torch.randn(meta_batch, ways * (shots + queries), 1, 28, 28, generator=g)
    y = torch.arange(ways).repeat_interleave(shots + queries).expand(meta_batch, -1).clone()
    s = ways * shots
    return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:]), "standard-normal images"


def meta_gradient(make: Any, batch: TaskBatch, device: torch.device, dtype: torch.dtype, mode: str) -> dict:
    learner = make().to(device, dtype)
    learner.precise_norms = mode != "float32-imprecise-norms"
    learner.tf32 = mode == "tf32"  # the learner's own switch (metagrad.numerics): off, its calls run in float32
    if mode in ("bfloat16", "float16"):
        learner.autocast = getattr(torch, mode)
    grads = learner.meta_gradient(batch.to(device, dtype))[0]
    return {k: v.detach().to("cpu", torch.float64) for k, v in grads.items()}


def compare(ref: dict, got: dict) -> dict[str, float]:
    keys = [k for k in ref if not (k.startswith("convs.") and k.endswith(".bias"))]
    r = torch.cat([ref[k].flatten() for k in keys])
    q = torch.cat([got[k].flatten() for k in keys])
    worst = max(float((ref[k] - got[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in keys)
    return {
        "rel_error": float((r - q).norm() / r.norm()),
        "worst_tensor": worst,
        "cosine": float(torch.nn.functional.cosine_similarity(r, q, dim=0)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--data", type=Path, default=OMNIGLOT, help="Omniglot folder (default: $OMNIGLOT or "
                   "../shared/data/omniglot); standard-normal images where it is missing")  # fmt: skip
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    # float32-imprecise-norms: learner.precise_norms = False (PyTorch's channels-last CPU batch norm: see
    # metagrad.models.norm._PreciseBatchNorm); on a GPU the TF32 that PyTorch's cuDNN convolutions use by default.
    modes = ["float32", "bfloat16"] + (["tf32", "float16"] if device.type == "cuda" else ["float32-imprecise-norms"])
    images, source = omniglot_batch(args.meta_batch, 5, 1, 15, args.data)
    waves = Sinusoid().sample(25, 10, 10, torch.Generator().manual_seed(0))

    def conv(first_order: bool) -> Any:
        def make() -> MAML:
            torch.manual_seed(0)
            model = Conv4(ways=5, hidden=args.channels, image_size=28)
            return MAML(model, inner_lr=0.4, inner_steps=args.steps, loss="cross_entropy", first_order=first_order)

        return make

    def mlp() -> MAML:
        torch.manual_seed(0)
        return MAML(MLP(), inner_lr=0.01, inner_steps=1)

    problems = [
        (f"Conv-4 MAML, {args.steps} step(s)", conv(False), images),
        (f"Conv-4 first-order MAML, {args.steps} step(s)", conv(True), images),
        ("sinusoid MLP MAML, 1 step", mlp, waves),
    ]
    rows = []
    for name, make, batch in problems:
        ref = meta_gradient(make, batch, torch.device("cpu"), torch.float64, "float32")
        for mode in modes:
            dtype = torch.float32
            row: dict[str, Any] = {"problem": name, "mode": mode, "device": str(device)}
            try:
                row.update(compare(ref, meta_gradient(make, batch, device, dtype, mode)))
            except Exception as e:  # report and go on (e.g. a kernel without bfloat16 support)
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            rows.append(row)
            print(row, flush=True)
    columns = [
        ("problem", "problem", str),
        ("mode", "mode", str),
        ("rel_error", "rel_error", lambda v: f"{v:.2e}"),
        ("worst_tensor", "worst_tensor", lambda v: f"{v:.2e}"),
        ("cosine", "cosine", lambda v: f"{v:.6f}"),
        ("error", "error", str),
    ]
    print(f"\nimages: {source}; reference: float64 on the CPU")
    print(format_table(rows, [c for c in columns if any(c[0] in r for r in rows)]))
    if args.json:
        info = machine_info(device)
        settings = {"channels": args.channels, "steps": args.steps, "meta_batch": args.meta_batch, "images": source}
        write_json(args.json, {"benchmark": "precision", "machine": info, "settings": settings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
