"""Meta-training throughput: meta-iterations per second of ``learner.meta_gradient``.

Run from the repository root::

    python benchmarks/throughput.py                       # everything (~15 min on 2 idle CPU cores)
    python benchmarks/throughput.py --quick               # loop and vmap, 1 thread, 0.5 s each (< 1 min)
    python benchmarks/throughput.py --algorithms maml fomaml --steps 5 --paths vmap compiled --threads all
    python benchmarks/throughput.py --device cuda --threads all --json results/throughput_cuda.json
    python benchmarks/throughput.py --protocol conv4 --ways 5 20 --steps 1 5   # Conv-4 on image episodes

``--protocol conv4`` runs ``benchmarks/conv4.py`` with the options that follow (see its docstring): Omniglot-
sized 5-way and/or 20-way 1-shot episodes, meta-batch 32, Conv-4-64, beside learn2learn's per-task loop in the
same run (5-way), and the arithmetic floor. What follows is the default protocol, the MAML sinusoid's.

One meta-iteration is one call of ``learner.meta_gradient(batch, iteration, generator)`` on a fixed batch of
the MAML sinusoid protocol (meta-batch 25 tasks, K = 10 support and 10 query points, 1-40-40-1 ReLU MLP):
the inner loop of every task and the meta-gradient, but not the outer optimizer step or the task sampling.

Paths:

* ``loop``     - ``vectorize=False``: the tasks of the meta-batch one after another in Python.
* ``vmap``     - ``vectorize=True`` (default): all tasks at once with ``torch.func.vmap``, eager.
* ``compiled`` - ``vectorize=True`` and ``learner.compile()``: the vmapped meta-step through ``torch.compile``.

Entries (``--entries``): ``meta_gradient`` (default) times the functional call above; ``backward`` times the
module path a PyTorch user writes, ``learner.zero_grad(); learner.backward(batch, ...)`` (the same meta-step plus
accumulating it into ``.grad``); ``backward_opt`` the same with ``optimizer.zero_grad()`` (the README's loop:
PyTorch's optimizer adds its own per-call cost); ``backward_accumulate`` leaves out ``zero_grad`` (gradients
accumulate in place); ``meta_gradient_grads`` is the functional loop the README showed before ``backward``
existed (``meta_gradient``, then each gradient put into ``.grad`` by hand). Several entries of one configuration
run on one learner (compiled once) with their timed blocks interleaved, the order rotating every round, and every
entry's rows get a ``vs functional`` column: the median over the rounds of its rate divided by ``meta_gradient``'s
in the same round, with the interquartile range of those paired ratios (``IQR``).

Threads: ``1`` and/or ``all`` (the cores this process may use), set with ``torch.set_num_threads``.

Columns:

* ``it/s``      - meta-iterations per second: the median over about five timed blocks that together take
                  ``--seconds``, after warm-up (with ``torch.cuda.synchronize`` at block ends on CUDA).
* ``MFLOP/it``  - (``--flops``) floating-point operations of one meta-iteration, counted by
                  ``torch.utils.flop_counter`` (matrix products and convolutions): the arithmetic each row must do.
* ``vs loop``   - it/s divided by the loop path's it/s for the same algorithm, inner steps and threads.
* ``vs maml``   - (``maml_enhanced`` rows) its it/s divided by second-order MAML's at the same inner steps,
                  path and threads: the price of Meta-Curvature, LSLR and the multi-step loss (< 1 = slower).
* ``compile_s`` - (``compiled`` rows) seconds of the first call, i.e. tracing plus Inductor compilation. By
                  default every configuration compiles with empty Inductor/Triton caches (a fresh temporary
                  folder, in-memory caches cleared), so this is a cold compile; ``--reuse-compile-cache`` uses
                  the normal on-disk cache instead (much faster on repeat runs). A compiled meta-step is
                  specialised to the thread count, so each thread setting compiles anew.

The figures are only comparable on an otherwise idle machine: another busy process on the same cores slows
every row and, with all threads, can make the vmap and compiled paths 10-1000 times slower (their OpenMP
workers then spin waiting for a core the other process holds). The load average is printed and saved, and a
warning is printed when it is high.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import (
    ALGORITHMS,
    QUERIES,
    SHOTS,
    all_threads,
    format_table,
    load_average,
    machine_info,
    make_batch,
    make_learner,
    resolve_device,
    synchronize,
    write_json,
)

PATHS = ("loop", "vmap", "compiled")
ENTRIES = ("meta_gradient", "meta_gradient_grads", "backward", "backward_opt", "backward_accumulate")
DEFAULT_STEPS = (1, 5)
DEFAULT_SECONDS = 2.0
BLOCKS = 5  # timed blocks per measurement; it/s is their median
MIN_BLOCKS = 3
INTERLEAVED_BLOCK_S = 0.1  # seconds per timed block when entries are interleaved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Meta-iterations per second of meta_gradient (MAML sinusoid protocol).",
        epilog="See the module docstring (top of benchmarks/throughput.py) for what the columns mean.",
    )
    p.add_argument("--protocol", choices=("sinusoid", "conv4"), default="sinusoid",
                   help="conv4: Conv-4 on image episodes beside learn2learn (benchmarks/conv4.py and its options)")
    p.add_argument(
        "--algorithms",
        nargs="+",
        choices=ALGORITHMS,
        default=list(ALGORITHMS),
        metavar="ALG",
        help=f"algorithms to time (default: all of {', '.join(ALGORITHMS)})",
    )
    p.add_argument("--steps", nargs="+", type=int, default=None, metavar="K", help="inner steps (default: 1 5)")
    p.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=None,
        metavar="PATH",
        help="loop, vmap, compiled (default: all three; --quick: loop vmap)",
    )
    p.add_argument(
        "--threads",
        nargs="+",
        default=None,
        metavar="N",
        help="torch.set_num_threads settings: integers or 'all' (default: 1 all; --quick: 1)",
    )
    p.add_argument(
        "--entries",
        nargs="+",
        choices=ENTRIES,
        default=["meta_gradient"],
        help="meta_gradient (functional, default), meta_gradient_grads (functional + .grad by hand), backward "
        "(zero_grad + backward, the nn.Module path into .grad), backward_accumulate (backward alone)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--flops",
        action="store_true",
        help="also count each configuration's floating-point operations per meta-iteration (MFLOP/it column; "
        "torch.utils.flop_counter over one eager meta_gradient call)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of the compiled path (reduce-overhead: CUDA graphs on a GPU)",
    )
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-iteration (default: 25)")
    p.add_argument("--iteration", type=int, default=0,
                   help="the training iteration every call passes, which sets the learner's schedule (default: 0, "
                        "where MAML Enhanced's multi-step loss is on; from 5000 on, after its 10 epochs of 500, "
                        "the last step's loss alone)")  # fmt: skip
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"timed seconds per configuration (default: {DEFAULT_SECONDS}; --quick: 0.5)",
    )
    p.add_argument("--json", metavar="FILE", help="also write machine info and all rows to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: loop and vmap only, 1 thread, 0.5 s each (explicit flags still win)",
    )
    p.add_argument(
        "--reuse-compile-cache",
        action="store_true",
        help="compile with the normal on-disk Inductor cache (warm compile_s) instead of a fresh one",
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = list(DEFAULT_STEPS)
    if args.paths is None:
        args.paths = ["loop", "vmap"] if args.quick else list(PATHS)
    if args.threads is None:
        args.threads = ["1"] if args.quick else ["1", "all"]
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else DEFAULT_SECONDS
    threads = []
    for t in args.threads:
        if t == "all":
            threads.append(all_threads())
        elif t.isdigit() and int(t) > 0:
            threads.append(int(t))
        else:
            p.error(f"--threads takes positive integers or 'all', got {t!r}")
    args.threads = list(dict.fromkeys(threads))  # 'all' may equal an explicit count
    if any(k < 1 for k in args.steps):
        p.error("--steps must be positive")
    if args.meta_batch < 1 or args.seconds <= 0:
        p.error("--meta-batch and --seconds must be positive")
    args.entries = [x for x in ENTRIES if x in args.entries]  # meta_gradient first: the others are paired with it
    args.paths = [x for x in PATHS if x in args.paths]  # loop first: the other paths are compared with it
    return args


def measure(step: Callable[[], Any], sync: Callable[[], None], seconds: float) -> dict[str, Any]:
    """Warm up, then time blocks of calls; returns the median block rate and the raw figures."""
    warm_until = time.perf_counter() + min(0.25 * seconds, 1.0)
    n_warm = 0
    while n_warm < 2 or time.perf_counter() < warm_until:
        step()
        n_warm += 1
    sync()
    t = time.perf_counter()
    step()
    sync()
    one = max(time.perf_counter() - t, 1e-7)
    target = seconds / BLOCKS
    per_block = max(1, round(target / one))
    rates: list[float] = []
    total_n, total_t = 0, 0.0
    while total_t < seconds or len(rates) < MIN_BLOCKS:
        t = time.perf_counter()
        n = 0
        # A block ends early if it runs far over its share (the calibration call can be unrepresentative).
        while n < per_block and (n == 0 or time.perf_counter() - t < 3 * target):
            step()
            n += 1
        sync()
        dt = time.perf_counter() - t
        rates.append(n / dt)
        total_n += n
        total_t += dt
    return {
        "it_per_s": statistics.median(rates),
        "it_per_s_mean": total_n / total_t,
        "iterations": total_n,
        "timed_s": total_t,
        "block_it_per_s": [round(r, 3) for r in rates],
        "warmup_iterations": n_warm + 1,
    }


def measure_interleaved(
    steps: dict[str, Callable[[], Any]], sync: Callable[[], None], seconds: float
) -> dict[str, dict[str, Any]]:
    """:func:`measure` for several entries of one configuration at once: their timed blocks alternate (the order
    rotates every round), so that a drift of the machine's speed hits them alike, and each round gives a paired
    ratio of every entry's rate to the first entry's."""
    names = list(steps)
    for f in steps.values():
        f(), f()
    sync()
    t = time.perf_counter()
    steps[names[0]]()
    sync()
    one = max(time.perf_counter() - t, 1e-7)
    # Short blocks, many rounds: a paired ratio compares blocks run a fraction of a second apart.
    per_block = max(1, round(min(seconds / BLOCKS, INTERLEAVED_BLOCK_S) / one))
    rates: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    totals = {n: [0, 0.0] for n in names}
    spent, rounds = 0.0, 0
    while spent < seconds * len(names) or rounds < MIN_BLOCKS:
        shift = rounds % len(names)
        this: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            f = steps[name]
            t = time.perf_counter()
            for _ in range(per_block):
                f()
            sync()
            dt = time.perf_counter() - t
            this[name] = per_block / dt
            rates[name].append(this[name])
            totals[name][0] += per_block
            totals[name][1] += dt
            spent += dt
        for name in ratios:
            ratios[name].append(this[name] / this[names[0]])
        rounds += 1
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        out[name] = {
            "it_per_s": statistics.median(rates[name]),
            "it_per_s_mean": totals[name][0] / totals[name][1],
            "iterations": totals[name][0],
            "timed_s": totals[name][1],
            "block_it_per_s": [round(r, 3) for r in rates[name]],
            "interleaved_rounds": rounds,
        }
        if name in ratios:
            q = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else ratios[name] * 3
            out[name].update(paired_with=names[0], paired_ratio=statistics.median(ratios[name]),
                             paired_ratio_iqr=[q[0], q[2]],
                             paired_ratios=[round(r, 4) for r in ratios[name]])  # fmt: skip
    return out


def run_config(
    algorithm: str, steps: int, path: str, threads: int, args: argparse.Namespace, entries: list[str]
) -> list[dict[str, Any]]:
    """One learner (compiled once on the compiled path) timed through each entry; several entries are timed
    interleaved (:func:`measure_interleaved`)."""
    device = args.device
    torch.set_num_threads(threads)
    base: dict[str, Any] = {
        "algorithm": algorithm,
        "steps": steps,
        "path": path,
        "threads": threads,
        "device": str(device),
        "meta_batch": args.meta_batch,
        "iteration": args.iteration,
        **({"compile_mode": args.compile_mode} if path == "compiled" else {}),
    }
    learner = make_learner(algorithm, steps, vectorize=path != "loop").to(device)
    batch = make_batch(args.meta_batch, device)
    generator = torch.Generator().manual_seed(1)  # Reptile's mini-batch indices are drawn on the CPU
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)  # only its zero_grad is timed
    iteration = args.iteration  # fixed: one point of the learner's schedule, so one compiled graph

    def make_step(entry: str) -> Callable[[], Any]:
        def step() -> Any:
            if entry == "backward":
                learner.zero_grad(set_to_none=True)
                out = learner.backward(batch, iteration, generator)
            elif entry == "backward_opt":  # the README's loop: the optimizer's zero_grad
                optimizer.zero_grad()
                out = learner.backward(batch, iteration, generator)
            elif entry == "backward_accumulate":  # no zero_grad: gradients accumulate in place
                out = learner.backward(batch, iteration, generator)
            elif entry == "meta_gradient_grads":  # the functional loop of the README before backward()
                gp, gm, out = learner.meta_gradient(batch, iteration, generator)
                for tree, grads in ((learner.params, gp), (learner.meta_state, gm)):
                    named = dict(tree.items())
                    for k, g in grads.items():
                        named[k].grad = g
            else:
                out = learner.meta_gradient(batch, iteration, generator)
            return out

        return step

    def sync() -> None:
        synchronize(device)

    steps_by_entry = {e: make_step(e) for e in entries}
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        learner.meta_gradient(batch, iteration, torch.Generator().manual_seed(1))  # the first call also checks shapes
        with FlopCounterMode(display=False) as counter:
            learner.meta_gradient(batch, iteration, torch.Generator().manual_seed(1))
        base["mflop_per_it"] = counter.get_total_flops() / 1e6
    rows = [{**base, "entry": e} for e in entries]
    cold = path == "compiled" and not args.reuse_compile_cache
    try:
        with fresh_compile_cache() if cold else contextlib.nullcontext():
            if path == "compiled":
                torch._dynamo.reset()  # a clean compile per configuration (and no recompile limit across them)
                learner.compile(**({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
                sync()
                t = time.perf_counter()
                steps_by_entry[entries[0]]()
                sync()
                rows[0]["compile_s"] = time.perf_counter() - t
            if len(entries) == 1:
                rows[0].update(measure(steps_by_entry[entries[0]], sync, args.seconds))
            else:
                figures = measure_interleaved(steps_by_entry, sync, args.seconds)
                for row in rows:
                    row.update(figures[row["entry"]])
    except Exception as e:  # report the failure in the table and carry on
        for row in rows:
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return rows


@contextlib.contextmanager
def fresh_compile_cache() -> Iterator[None]:
    """Empty Inductor (and Triton) caches, on disk and in memory, for a cold compile; removed afterwards."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)
    if fresh is not None:
        with fresh():
            yield
        return
    # Fallback for a torch without those helpers: a temporary cache folder (in-memory caches stay).
    folder = tempfile.mkdtemp(prefix="metagrad-bench-inductor-")
    old = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    def key(r: dict[str, Any], **over: Any) -> tuple:
        r = {**r, **over}
        return (r["algorithm"], r["steps"], r["path"], r["threads"], r.get("entry", "meta_gradient"))

    rate = {key(r): r["it_per_s"] for r in rows if r.get("it_per_s")}
    for r in rows:
        if "it_per_s" not in r:
            continue
        loop = rate.get(key(r, path="loop"))
        if loop:
            r["speedup_vs_loop"] = r["it_per_s"] / loop
        functional = rate.get(key(r, entry="meta_gradient"))
        if r.get("paired_with") == "meta_gradient":  # interleaved with meta_gradient: the median of paired ratios
            r["ratio_vs_functional"] = r["paired_ratio"]
        elif r.get("entry", "meta_gradient") != "meta_gradient" and functional:
            r["ratio_vs_functional"] = r["it_per_s"] / functional
        maml = rate.get(key(r, algorithm="maml"))
        if r["algorithm"] == "maml_enhanced" and maml:
            r["ratio_vs_maml"] = r["it_per_s"] / maml


COLUMNS = [
    ("algorithm", "algorithm", str),
    ("steps", "steps", str),
    ("path", "path", str),
    ("threads", "threads", str),
    ("entry", "entry", str),
    ("it_per_s", "it/s", lambda v: f"{v:.1f}" if v < 1000 else f"{v:.0f}"),
    ("mflop_per_it", "MFLOP/it", lambda v: f"{v:.1f}"),
    ("speedup_vs_loop", "vs loop", lambda v: f"{v:.1f}x"),
    ("ratio_vs_maml", "vs maml", lambda v: f"{v:.2f}x"),
    ("ratio_vs_functional", "vs functional", lambda v: f"{v:.3f}x"),
    ("paired_ratio_iqr", "IQR", lambda v: f"{v[0]:.3f}-{v[1]:.3f}"),
    ("compile_s", "compile_s", lambda v: f"{v:.1f}"),
    ("error", "error", str),
]


def main(argv: list[str] | None = None) -> int:
    protocol = argparse.ArgumentParser(add_help=False)
    protocol.add_argument("--protocol", choices=("sinusoid", "conv4"), default="sinusoid")
    chosen, rest = protocol.parse_known_args(sys.argv[1:] if argv is None else argv)
    if chosen.protocol == "conv4":  # the image protocol, beside learn2learn: benchmarks/conv4.py, its options
        import conv4

        return conv4.main(rest)
    args = parse_args(rest)
    args.device = resolve_device(args.device)
    info = machine_info(args.device)
    load = info["load_average_start"]
    print(
        f"torch {info['torch']} | {info['device_name']} ({args.device}) | {info['cpus_available']} CPUs available | "
        f"load average {load}",
        flush=True,
    )
    if load and args.device.type == "cpu" and load[0] > 0.5:
        print(
            f"warning: load average {load[0]} - other processes share the CPU; figures will be low and noisy",
            file=sys.stderr,
            flush=True,
        )

    configs = [(a, k, p, t) for a in args.algorithms for k in args.steps for t in args.threads for p in args.paths]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for i, (a, k, p, t) in enumerate(configs, 1):
            for row in run_config(a, k, p, t, args, args.entries):
                rows.append(row)
                extra = f", compile {row['compile_s']:.1f} s" if "compile_s" in row else ""
                result = f"{row['it_per_s']:.1f} it/s" if "it_per_s" in row else row.get("error", "?")
                if "paired_ratio" in row:
                    lo, hi = row["paired_ratio_iqr"]
                    result += f" ({row['paired_ratio']:.3f}x of {args.entries[0]}, IQR {lo:.3f}-{hi:.3f})"
                print(f"[{i}/{len(configs)}] {a} steps={k} path={p} threads={t} {row['entry']}: {result}{extra}",
                      flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(info["torch_default_threads"])
    add_ratios(rows)
    info["load_average_end"] = load_average()
    elapsed = time.perf_counter() - start
    print()
    print(format_table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)]))
    end_load = info["load_average_end"]
    print(f"\n{len(rows)} rows ({len(configs)} configurations) in {elapsed:.0f} s; load average at end {end_load}")
    if args.json:
        settings = {
            "algorithms": args.algorithms,
            "steps": args.steps,
            "paths": args.paths,
            "entries": args.entries,
            "threads": args.threads,
            "meta_batch": args.meta_batch,
            "shots": SHOTS,
            "queries": QUERIES,
            "seconds": args.seconds,
            "quick": args.quick,
            "compile_cache": "reused" if args.reuse_compile_cache else "fresh per configuration (cold compile)",
            "compile_mode": args.compile_mode,
            "flops": args.flops,
            "elapsed_s": round(elapsed, 1),
        }
        write_json(args.json, {"benchmark": "throughput", "machine": info, "settings": settings, "rows": rows})
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
