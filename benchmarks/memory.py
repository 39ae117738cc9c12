"""Peak memory of meta-training against the number of inner steps.

Run from the repository root::

    python benchmarks/memory.py                                  # maml, fomaml, maml_enhanced; 1 5 10 20 steps
    python benchmarks/memory.py --steps 1 5
    python benchmarks/memory.py --device cuda --json results/memory_cuda.json

Every configuration (algorithm, inner steps) runs in a fresh Python process, which builds the learner and a
meta-batch of the MAML sinusoid protocol (25 tasks, K = 10 support and 10 query points, 1-40-40-1 ReLU MLP;
``--meta-batch`` changes the 25), then calls ``learner.meta_gradient`` ``--iterations`` times.

Setup ends with one warm-up call of ``meta_gradient`` on a single task, so that one-off costs of the first
call (lazy imports and initialisation in ``torch.func``, about 80 MiB of RSS on the CPU) are part of the
baseline rather than of the increase; ``--no-warmup`` leaves them in.

* CPU: ``increase`` is the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
  at the end minus its resident set size right after setup (imports, learner, batch, warm-up). RSS moves
  in allocator-sized chunks and this network is tiny, so differences below about 1 MiB are noise; the
  ``MiB per inner step`` lines (least-squares slope of the increase against the inner steps) show the part
  that grows with the inner steps. ``note`` flags a configuration whose peak was already reached during
  setup (its increase is then a lower bound).
* CUDA: ``increase`` is ``torch.cuda.max_memory_allocated()`` during the iterations minus
  ``torch.cuda.memory_allocated()`` after setup (tensors only; the caching allocator's reserve and the CUDA
  context are not counted). The CPU process figures are reported alongside.

Second-order MAML keeps every inner step's activations and the graph of the inner gradients for the
meta-gradient, so its memory grows with the inner steps; first-order MAML detaches the inner gradients;
MAML Enhanced adds Meta-Curvature's preconditioning and the multi-step loss on top of second-order MAML.
iMAML differentiates none of its inner steps (the implicit gradient needs the last iterate only, then conjugate
gradient on Hessian-vector products there), so its memory should not grow with them.
``vs maml`` is the increase divided by second-order MAML's at the same inner steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

RESULT_PREFIX = "RESULT "
DEFAULT_ALGORITHMS = ("maml", "fomaml", "maml_enhanced", "imaml")
# iMAML is built here (benchmarks/_common.py is shared with the throughput benchmark): the sinusoid preset's
# proximal problem (configs/sinusoid/imaml.toml: lr 0.01, λ = 1, 5 CG steps) with the measured inner steps.
EXTRA_ALGORITHMS = ("imaml",)


def _make_imaml(algorithm: str, steps: int, vectorize: bool) -> Any:
    import torch

    from metagrad.algorithms import IMAML
    from metagrad.models import MLP

    torch.manual_seed(0)
    return IMAML(MLP(), inner_lr=0.01, inner_steps=steps, lam=1.0, cg_steps=5, vectorize=vectorize)
DEFAULT_STEPS = (1, 5, 10, 20)
MIB = 2**20


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh process: setup, then the iterations; returns the measured figures (bytes)."""
    import torch
    from _common import make_batch, make_learner

    device = torch.device(config["device"])
    build = _make_imaml if config["algorithm"] == "imaml" else make_learner
    learner = build(config["algorithm"], config["steps"], vectorize=config["path"] != "loop").to(device)
    batch = make_batch(config["meta_batch"], device)
    generator = torch.Generator().manual_seed(1)
    if config["warmup"]:
        # One call on a single task pays the one-off costs (lazy imports and initialisation in torch.func,
        # thread pools) before the baseline, while using next to no memory for activations.
        learner.meta_gradient(batch[:1], 0, torch.Generator().manual_seed(2))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    setup_rss = _current_rss_bytes()
    setup_peak = _maxrss_bytes()
    start = time.perf_counter()
    out = None
    for i in range(config["iterations"]):
        out = learner.meta_gradient(batch, i, generator)
        if cuda:
            torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del out
    peak = _maxrss_bytes()
    # Without /proc, fall back on the high-water mark after setup (then the increase can only be a lower bound).
    base = setup_rss if setup_rss is not None else setup_peak
    result: dict[str, Any] = {
        "rss_setup": base,
        "rss_peak": peak,
        "rss_increase": peak - base,
        "rss_peak_reached_in_setup": peak <= setup_peak,
        "seconds_per_iteration": elapsed / max(config["iterations"], 1),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        cuda_peak = torch.cuda.max_memory_allocated(device)
        result.update(cuda_setup=cuda_base, cuda_peak=cuda_peak, cuda_increase=cuda_peak - cuda_base)
    return result


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh interpreter (the same as multiprocessing's 'spawn', without its pickling)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}"[:300]}


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y against x."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _common import ALGORITHMS

    p = argparse.ArgumentParser(
        description="Peak memory of meta_gradient against inner steps, one fresh process per configuration.",
        epilog="See the module docstring (top of benchmarks/memory.py) for what the figures mean.",
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        choices=ALGORITHMS + EXTRA_ALGORITHMS,
        default=list(DEFAULT_ALGORITHMS),
        metavar="ALG",
        help=f"algorithms (default: {' '.join(DEFAULT_ALGORITHMS)}; also: reptile, metasgd)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=list(DEFAULT_STEPS),
        metavar="K",
        help=f"inner steps (default: {' '.join(map(str, DEFAULT_STEPS))})",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--iterations", type=int, default=5, help="meta_gradient calls per configuration (default: 5)")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-iteration (default: 25)")
    p.add_argument(
        "--path",
        choices=("vmap", "loop"),
        default="vmap",
        help="vmap (vectorize=True, default) or loop (vectorize=False)",
    )
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the one-task warm-up call before the baseline (the increase then holds one-off costs)",
    )
    p.add_argument("--json", metavar="FILE", help="also write machine info and all rows to this JSON file")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.steps) or args.iterations < 1 or args.meta_batch < 1:
        p.error("--steps, --iterations and --meta-batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        print(RESULT_PREFIX + json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0

    from _common import format_table, load_average, machine_info, resolve_device, write_json

    args = parse_args(argv)
    device = resolve_device(args.device)
    info = machine_info(device)
    cuda = device.type == "cuda"
    print(f"torch {info['torch']} | {info['device_name']} ({device}) | load average {info['load_average_start']}")

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for algorithm in args.algorithms:
        for steps in args.steps:
            config = {
                "algorithm": algorithm,
                "steps": steps,
                "path": args.path,
                "device": str(device),
                "meta_batch": args.meta_batch,
                "iterations": args.iterations,
                "warmup": not args.no_warmup,
            }
            row = {**config, **run_child(config)}
            rows.append(row)
            key = "cuda_increase" if cuda else "rss_increase"
            result = f"+{row[key] / MIB:.1f} MiB" if key in row else row["error"]
            print(f"{algorithm} steps={steps}: {result}", flush=True)

    key = "cuda_increase" if cuda else "rss_increase"
    maml = {r["steps"]: r[key] for r in rows if r["algorithm"] == "maml" and key in r}
    for r in rows:
        for k in ("rss_setup", "rss_peak", "rss_increase", "cuda_setup", "cuda_peak", "cuda_increase"):
            if k in r:
                r[k + "_mib"] = r[k] / MIB
        if key in r and maml.get(r["steps"]):
            r["ratio_vs_maml"] = r[key] / maml[r["steps"]]
        if r.get("rss_peak_reached_in_setup"):
            r["note"] = "peak reached during setup"

    def mib(v: float) -> str:
        return f"{v:.1f}"

    columns = [
        ("algorithm", "algorithm", str),
        ("steps", "steps", str),
        ("path", "path", str),
    ]
    if cuda:
        columns += [
            ("cuda_setup_mib", "CUDA setup MiB", mib),
            ("cuda_peak_mib", "CUDA peak MiB", mib),
            ("cuda_increase_mib", "CUDA increase MiB", mib),
        ]
    columns += [
        ("rss_setup_mib", "RSS setup MiB", mib),
        ("rss_peak_mib", "RSS peak MiB", mib),
        ("rss_increase_mib", "RSS increase MiB", mib),
        ("ratio_vs_maml", "vs maml", lambda v: f"{v:.2f}x"),
        ("note", "note", str),
        ("error", "error", str),
    ]
    print()
    print(format_table(rows, [c for c in columns if any(c[0] in r for r in rows)]))
    print()
    slopes: dict[str, float] = {}
    for algorithm in args.algorithms:
        s = slope([(r["steps"], r[key] / MIB) for r in rows if r["algorithm"] == algorithm and key in r])
        if s is not None:
            slopes[algorithm] = s
            print(f"{algorithm}: {s:.2f} MiB per inner step ({'CUDA allocated' if cuda else 'RSS'}, least squares)")
    info["load_average_end"] = load_average()
    elapsed = time.perf_counter() - start
    print(f"{len(rows)} configurations in {elapsed:.0f} s")
    if args.json:
        settings = {
            "algorithms": args.algorithms,
            "steps": args.steps,
            "path": args.path,
            "meta_batch": args.meta_batch,
            "iterations": args.iterations,
            "measure": "cuda max_memory_allocated" if cuda else "ru_maxrss - RSS after setup",
            "warmup": not args.no_warmup,
            "mib_per_step": slopes,
            "elapsed_s": round(elapsed, 1),
        }
        write_json(args.json, {"benchmark": "memory", "machine": info, "settings": settings, "rows": rows})
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
