"""Paired A/B of ``torch.compile`` options on the sinusoid training iteration, in one process.

Run from the repository root (one core)::

    taskset -c 0 python benchmarks/compile_ab.py --steps 1 5 [--rounds 10] [--json docs/data/compile_ab_cpu.json]

Separate benchmark processes on a shared machine differ by ±10 % or more from run to run. Here each variant is a
``Trainer`` on ``configs/sinusoid/maml.toml`` (one thread) whose learner is compiled its own way, all built in one
process. After a warm-up, the variants take turns: each round runs ``--calls`` of ``Trainer.step()`` on every
variant, one variant after the other, in an order that rotates every round. The medians over the rounds are
printed, with each variant's time relative to ``default`` (the ratio of medians, and the median of the rounds'
ratios, each round's variant against that round's ``default``). Variants:

- ``default``: ``learner.compile()`` as ``metagrad train`` calls it (on the CPU: Inductor's C++ wrapper and
  :func:`metagrad.graph_passes.cpu_passes`), with the update fused into the compiled step
  (:mod:`metagrad.fused_update`, ``train.fused_update = true``);
- ``separate-update``: the same compile, the norm, guard and Adam step run separately
  (``train.fused_update = false``, the previous rounds' iteration);
- ``no-outer-products``: the default without :class:`metagrad.outer_products.OuterProducts`, update fused;
- ``no-bmm-pass``: the default without ``BatchedMatmulOrientation``, update fused;
- ``no-permuted-sum``: the default without :class:`metagrad.permuted_reduction.PermutedReduction`, update fused;
- ``build-separate``: the default with Inductor's ``cpp_wrapper_build_separate`` (the C++ wrapper built at -O1
  apart from the kernels at -O3: a shorter cold compile), update fused;
- ``no-memory-planning``: the default without Inductor's ``memory_planning`` (one allocation per intermediate
  tensor instead of one pool per call), update fused;
- ``no-size-asserts``: the default without Inductor's checks of the inputs' sizes, strides and alignment on every
  call (``size_asserts``, ``alignment_asserts``), update fused;
- ``python-wrapper``: PyTorch's defaults, ``compile(options={})``, update fused.

Every variant but ``python-wrapper`` compiles with ``compile()``'s own options on this CPU, with at most one change.

Every variant trains the same run for the same number of steps, so the script also prints how far each one's
weights ended from ``default``'s: 0 where a variant changes no value (the exact passes, memory planning, the C++
wrapper), rounding where it computes in another order (the bmm pass, the separate update's Adam).

The first call of each variant (its compile) is timed too, but the variants share one process and its warm
imports, so only ``benchmarks/iteration.py`` gives a cold-compile figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from metagrad import Trainer
from metagrad.graph_passes import GraphPasses, cpu_passes
from metagrad.matmul_orientation import BatchedMatmulOrientation
from metagrad.outer_products import OuterProducts
from metagrad.permuted_reduction import PermutedReduction
from metagrad.presets import preset


def _without(kind: type) -> dict[str, Any]:
    """compile()'s pass chain on this CPU less the passes of one kind."""
    return {"post_grad_custom_post_pass": GraphPasses(*(p for p in cpu_passes().passes if not isinstance(p, kind)))}


# How each variant changes compile()'s own Inductor options (None: PyTorch's defaults, no options), and whether
# the update is fused into the compiled step.
VARIANTS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "default": ({}, True),
    "separate-update": ({}, False),
    "no-outer-products": (_without(OuterProducts), True),
    "no-bmm-pass": (_without(BatchedMatmulOrientation), True),
    "no-permuted-sum": (_without(PermutedReduction), True),
    "build-separate": ({"cpp_wrapper_build_separate": True}, True),
    "no-memory-planning": ({"memory_planning": False}, True),
    "no-size-asserts": ({"size_asserts": False, "alignment_asserts": False}, True),
    "python-wrapper": (None, True),
}


def build(steps: int, variant: str, root: Path) -> tuple[Trainer, float]:
    cfg = preset("maml")
    cfg.algorithm.inner_steps = steps
    cfg.train.compile, cfg.train.threads, cfg.train.iterations = False, 1, 10**9
    cfg.train.val_every = cfg.train.checkpoint_every = 10**9
    changes, cfg.train.fused_update = VARIANTS[variant]
    trainer = Trainer(cfg, root / f"{variant}-{steps}")
    trainer.learner.compile()
    if changes is None:
        trainer.learner.compile(options={})
    elif changes:
        own = dict(trainer.learner._torch_compile_options["options"])  # what compile() chose on this CPU
        trainer.learner.compile(options=own | changes)
    t0 = time.perf_counter()
    trainer.step()
    return trainer, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=300, help="Trainer.step calls per variant per round")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if "default" not in args.variants:
        args.variants = ["default", *args.variants]
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for steps in args.steps:
            trainers, first = {}, {}
            for v in args.variants:
                trainers[v], first[v] = build(steps, v, Path(d))
            for t in trainers.values():
                for _ in range(args.warmup):
                    t.step()
            times: dict[str, list[float]] = {v: [] for v in trainers}
            names = list(trainers)
            for r in range(args.rounds):
                # The order rotates every round: in a fixed order the later variants ran 1-4 % faster.
                for v in names[r % len(names) :] + names[: r % len(names)]:
                    t = trainers[v]
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        t.step()
                    times[v].append((time.perf_counter() - t0) / args.calls * 1e6)
            base = statistics.median(times["default"])
            print(f"sinusoid MAML, {steps} inner step(s), one thread: median µs per Trainer.step over "
                  f"{args.rounds} rounds of {args.calls}")  # fmt: skip
            for v, ts in times.items():
                med = statistics.median(ts)
                paired = statistics.median(a / b for a, b in zip(ts, times["default"], strict=True))
                print(f"  {v:<16} {med:8.0f} µs  {med / base:5.2f}× default, paired {paired:5.3f}×  "
                      f"(rounds {min(ts):.0f}-{max(ts):.0f}; first call {first[v]:.1f} s)")  # fmt: skip
                results.append({"steps": steps, "variant": v, "median_us": med, "rounds_us": ts,
                                "first_call_s": first[v], "vs_default": med / base,
                                "paired_vs_default": paired})  # fmt: skip
            ref = dict(trainers["default"].learner.named_parameters())
            for v, t in trainers.items():
                gap = max((p - ref[k]).abs().max().item() for k, p in t.learner.named_parameters())
                print(f"  {v:<16} weights after {t.iteration} steps: largest difference from default {gap:.3g}")
                results.append({"steps": steps, "variant": v, "iterations": t.iteration, "max_weight_gap": gap})
            for t in trainers.values():
                t.close()
    if args.json:
        info = {"torch": torch.__version__, "threads": 1, "rounds": args.rounds, "calls": args.calls}
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
