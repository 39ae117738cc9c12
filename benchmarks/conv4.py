"""Conv-4 meta-training throughput and peak memory, beside learn2learn in the same run, and the arithmetic floor.

Run from the repository root (learn2learn's virtual environment from ``bash ../shared/peers/setup.sh``)::

    python benchmarks/conv4.py                                  # 5-way 1-shot, 1 and 5 steps, 1 and 2 threads
    python benchmarks/conv4.py --steps 1 --threads 1 --iters 3  # one setting, quicker
    python benchmarks/conv4.py --ways 20 --paths auto --no-peer # 20-way (the peer's script is 5-way only)
    python benchmarks/conv4.py --ways 5 20                      # both (learn2learn beside the 5-way rows)
    python benchmarks/conv4.py --paths auto vmap chunk:8 compiled --json docs/data/conv4_cpu.json
    python benchmarks/conv4.py --paths auto --allocator kept default --peer-allocator default kept

Protocol (``../shared/peers/common_conv4.py``, the peer scripts' own): Omniglot-sized 1x28x28 standard-normal
images (timing only), ``--ways``-way 1-shot with 15 queries per class, meta-batch 32, Conv-4 with 64 filters
(3x3 conv, batch norm with the batch's statistics, ReLU, 2x2 max-pool; metagrad's ``Conv4``), inner SGD at
lr 0.4 for ``--steps`` steps, second order, Adam 1e-3. One meta-iteration is what a training loop does:
``opt.zero_grad(); learner.backward(batch); opt.step()``, with ``learner.diagnostics = False`` as the peer
computes no pre-adaptation loss (``--diagnostics`` keeps it: one more forward pass of the query set per task).

Every row runs in a fresh process, so ``peak MiB``, the process's maximum resident set, is that row's own.
``steady``, on the CPU, is the process's maximum during the warm-up and timed iterations, after the first call
(with what its compilation freed given back first). The rows of one (steps, threads) setting run one after
another, metagrad's beside the peer's, ``--rounds`` times in turn: ``vs l2l`` is the median of metagrad's it/s
over the peer's in the same round.

Paths (``vectorize`` of :class:`metagrad.MetaLearner`): ``auto`` (the default: for a convolutional network the
tasks one after another), ``loop`` (``vectorize=False``), ``vmap`` (all 32 tasks in one ``vmap``), ``chunk:K``
(``vmap`` over K tasks at a time), ``compiled`` (``auto`` plus ``learner.compile()``; its first call, the
compilation, is ``first_s``), ``vmap-compiled`` (``vmap`` plus ``learner.compile()``: what a GPU runs),
``imprecise-norms`` (``auto`` with ``learner.precise_norms = False``: PyTorch's
channels-last CPU batch norm, faster and less precise in float32, see metagrad.models.norm._PreciseBatchNorm),
``graphs`` (on a GPU, ``--device cuda``: ``vmap`` and the trainer's whole update replayed from a CUDA graph,
``metagrad.fused_update.FusedUpdate(graphs=True)``; its ``first_s`` is the first, eager, iteration),
``graphs-loop`` (the same with the tasks one after another: plain convolutions, all launched by the graph),
``graphs-compiled`` (``graphs`` with ``learner.compile()``: Inductor's update in the graph; ``first_s`` is the
compilation). A path may
end in ``+tf32`` or ``+bf16``: ``learner.tf32 = True`` or bfloat16 autocast, the GPU's faster arithmetic (less
precise, docs/results.md), ``+products``: every convolution a matrix product over 3x3 patches
(``Conv3x3.products``; under ``vmap`` one batched product instead of a grouped convolution; the default under
``vmap`` on a GPU), ``+convolutions``: every convolution cuDNN's or oneDNN's (grouped under ``vmap``), or
``+shifts``: the product's patches gathered in the weight's ``(c, kh, kw)`` order and differentiated by autograd,
instead of the default ``"blocks"`` (``Conv3x3.patches``), or ``+autograd``: the blocks with their backward pass
left to autograd instead of the written-out adjoint (what that adjoint is worth), ``+serial``: the task loop one task
at a time with every thread on its operators (``learner.task_threads = 1``, as before task threads; the default
runs whole tasks side by side on the threads, ``metagrad.task_threads``), or ``+stride``: the MAML code's
Omniglot network (``Conv4(downsample="stride")``: stride-2 convolutions instead of max-pooling, about 3.5x less
arithmetic; beside learn2learn on its own Omniglot network, ``OmniglotCNN``, the same strided network, run by
``peer_conv4_l2l_strided.py`` on the shared script's loop; each row's floor is its own network's).
``--profile N`` writes each row's busiest operators over N iterations (on a GPU, its kernels by GPU time, also
those a graph replays).

The floor: ``torch.utils.flop_counter`` counts the floating-point operations of one meta-iteration's
convolutions and matrix products (the exact second-order computation; element-wise work is left out, so the
true floor is higher), and ``floor_s`` divides them by the best rate this machine reaches on a large matrix
product at the same thread count, measured in the same run (``peak GF/s``). ``vs floor`` is ``floor_s`` over
the measured seconds per iteration (1 = at the floor), for learn2learn's rows too (the same arithmetic on the
same network). Each setting's table ends with what the issue's target, twice learn2learn's rate, asks: that rate
as a fraction of the floor (above 1, faster than the floor itself allows, so out of reach on this machine).

The allocator (in brackets after each row's name): metagrad's rows keep freed memory for reuse
(``metagrad.allocator.keep_freed_memory``), as ``metagrad train`` and :class:`metagrad.Trainer` do on the CPU;
``--allocator default`` leaves glibc's defaults. learn2learn's rows run with glibc's defaults, and
``--peer-allocator kept`` with the same two settings through glibc's environment variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): the comparison on equal allocators. Both options take
several values, run in turn; ``vs l2l`` is beside the peer's row on the same allocator where there is one.

Absolute figures on a shared machine are noisy: the load average is printed, and only ratios measured in the
same round are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "peers"))
PEER_PYTHON = Path(os.environ.get("PEERS_VENVS", "/tmp")) / "peers-venv-l2l" / "bin" / "python"

SHOTS, QUERIES, META_BATCH, HIDDEN, IMAGE, INNER_LR, META_LR = 1, 15, 32, 64, 28, 0.4, 1e-3


def make_data(ways: int, meta_batch: int, seed: int = 0, queries: int = QUERIES) -> tuple[np.ndarray, ...]:
    """The peers' fixed random episodes (``common_conv4.make_data``, the same draws for 5 ways)."""
    rng = np.random.default_rng(seed)
    sx = rng.standard_normal((meta_batch, ways * SHOTS, 1, IMAGE, IMAGE), dtype=np.float32)
    qx = rng.standard_normal((meta_batch, ways * queries, 1, IMAGE, IMAGE), dtype=np.float32)
    sy = np.tile(np.repeat(np.arange(ways), SHOTS), (meta_batch, 1)).astype(np.int64)
    qy = np.tile(np.repeat(np.arange(ways), queries), (meta_batch, 1)).astype(np.int64)
    return sx, sy, qx, qy


GRAPHED = ("graphs", "graphs-loop", "graphs-compiled")  # the paths replayed from CUDA graphs


def _learner(path: str, ways: int, steps: int) -> Any:
    import torch

    from metagrad.algorithms.maml import MAML
    from metagrad.models.conv4 import Conv4

    path, *options = path.split("+")  # graphs+tf32, graphs+bf16: the GPU's faster arithmetic
    unknown = set(options) - {"tf32", "bf16", "products", "convolutions", "shifts", "autograd", "stride", "serial"}
    if unknown:  # (a row named after an option that no longer exists would measure the default)
        raise SystemExit(f"unknown path options {sorted(unknown)}: tf32, bf16, products, convolutions, shifts, "
                         "autograd, stride or serial")
    if "autograd" in options:  # the blocks' gather differentiated by autograd (this row's process only)
        from _common import AutogradPatches

        from metagrad.models import conv4

        conv4._Patches = AutogradPatches
    paths = {"auto": "auto", "compiled": "auto", "loop": False, "vmap": True, "imprecise-norms": "auto",
             "vmap-compiled": True, "graphs": True, "graphs-loop": False, "graphs-compiled": True}
    vectorize: bool | int | str = paths.get(path, "")
    if path.startswith("chunk:"):
        vectorize = int(path.split(":", 1)[1])
    if vectorize == "":
        raise SystemExit(f"unknown path {path!r}: auto, loop, vmap, chunk:K, compiled, vmap-compiled, graphs, "
                         "graphs-loop, graphs-compiled or imprecise-norms")
    torch.manual_seed(0)
    model = Conv4(1, ways, HIDDEN, IMAGE, downsample=_network(options))
    learner = MAML(model, inner_lr=INNER_LR, inner_steps=steps, loss="cross_entropy", vectorize=vectorize)
    if path in ("compiled", "vmap-compiled", "graphs-compiled"):
        learner.compile()
    # PyTorch's channels-last CPU batch norm as it is: faster, float32 statistics less precise
    learner.precise_norms = path != "imprecise-norms"
    learner.tf32 = "tf32" in options
    if "serial" in options:  # one task at a time, every thread on its operators
        learner.task_threads = 1
    learner.autocast = torch.bfloat16 if "bf16" in options else None
    for module in learner.model.modules():
        if hasattr(module, "products"):
            if "products" in options:  # every convolution a (batched) matrix product over 3x3 patches
                module.products = True
            if "convolutions" in options:  # every convolution cuDNN's or oneDNN's (grouped, under vmap)
                module.products = False
            if "shifts" in options:  # how the product gathers its patches (Conv3x3.patches)
                module.patches = "shifts"
    return learner


def _configure(learner: Any, diagnostics: bool) -> Any:
    learner.diagnostics = diagnostics
    return learner


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process; or with ``spec["call"]``, the floor's ``count_flops`` or ``peak_rate``
    (in a process of their own, so that the driver stays small: a child inherits its parent's maximum resident set
    as its own starting ``ru_maxrss``, which would raise every row's ``peak MiB`` to the driver's)."""
    if "call" in spec:
        calls = {"count_flops": count_flops, "peak_rate": peak_rate}
        return {"value": calls[spec["call"]](*spec["args"])}
    import torch

    from metagrad.tasks.base import TaskBatch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    if spec.get("allocator", "kept") == "kept" and device.type == "cpu":
        from metagrad.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("freed memory not kept (not glibc, glibc refused, or the environment chooses the "
                             "allocator): run with --allocator default")
    learner = _configure(_learner(spec["path"], spec["ways"], spec["steps"]), spec["diagnostics"]).to(device)
    data = make_data(spec["ways"], spec["meta_batch"], queries=spec.get("queries", QUERIES))
    batch = TaskBatch(*(torch.from_numpy(a) for a in data)).to(device)
    opt = torch.optim.Adam(learner.parameters(), lr=META_LR, fused=device.type == "cuda" or None)
    if spec["path"].split("+")[0] in GRAPHED:  # the trainer's update on a GPU, in CUDA graphs
        from metagrad.fused_update import FusedUpdate, unfused_reason

        reason = unfused_reason(learner, opt, spec["meta_batch"], 1, graphed=True)
        if reason is not None:
            raise SystemExit(f"not replayed: {reason}")
        update = FusedUpdate(learner, opt, None, graphs=True)
        calls = iter(range(10**9))

        def step() -> None:
            update(batch, next(calls), None)  # (reads its metrics: a host synchronisation, as the trainer's)

        graphs = update.graphs
    else:

        def step() -> None:
            opt.zero_grad()
            learner.backward(batch)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    reset, first_peak = False, 0.0
    if device.type == "cpu":  # the peak from here on: the training's own, without the first call's compilation
        from metagrad.allocator import release_freed_memory

        first_peak = peak_mib()
        release_freed_memory()  # (what the compilation freed, which kept memory would otherwise hold)
        reset = reset_peak()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["iters"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    # (before a profile, whose records would count)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_mib()
    steady = {"steady_mib": peak} if reset else {}
    peak = max(peak, first_peak)  # the whole process's
    replayed = {}
    if spec["path"].split("+")[0] in GRAPHED:  # whether the graph was captured and replayed
        replayed = {"cuda_graphs": graphs.captures, "cuda_graphs_failed": graphs.failed}
    if spec.get("profile") and spec.get("profile_out"):
        out = Path(spec["profile_out"].format(path=spec["path"].replace("+", "_"), steps=spec["steps"]))
        try:  # the timing must come back even if the profiler fails on this machine
            profile_steps(step, spec["profile"], device, out)
        except Exception as e:  # noqa: BLE001
            out.write_text(f"profiling failed: {type(e).__name__}: {e}\n")
    return {"it_per_s": 1.0 / median, "first_s": first, "peak_mib": peak, **steady, **replayed}


def profile_steps(step: Any, steps: int, device: Any, out: Path) -> None:
    """``torch.profiler`` over ``steps`` meta-iterations, written to ``out``: the operators (on a GPU, the kernels,
    also those a CUDA graph replays) that take the most time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    # Whole kernel names (the functor inside an element-wise kernel says which operator launched it).
    table = events.table(sort_by=key, row_limit=40, max_name_column_width=240)
    out.write_text(f"{steps} meta-iterations\n{table}\n")


def _network(options: list[str]) -> str:
    """Which Conv-4 a row's path options name (``Conv4.downsample``)."""
    return "stride" if "stride" in options else "pool"


def peak_mib() -> float:
    """This process's maximum resident set: Linux's ``VmHWM``, which starts afresh at ``exec``, or else
    ``ru_maxrss``, which a child starts from its parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start this process's ``VmHWM`` afresh from its present resident set (Linux's ``clear_refs``); False
    where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def count_flops(ways: int, steps: int, meta_batch: int, queries: int = QUERIES, device: str = "cpu",
                network: str = "pool") -> float:  # fmt: skip
    """Convolution and matrix-product FLOPs of one meta-iteration (one task counted, times the meta-batch) of the
    pooling or the strided network (``network``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from metagrad.tasks.base import TaskBatch

    learner = _configure(_learner("loop" + ("+stride" if network == "stride" else ""), ways, steps), False)
    learner.to(device)
    batch = TaskBatch(*(torch.from_numpy(a) for a in make_data(ways, 1, queries=queries))).to(device)
    with FlopCounterMode(display=False) as counter:
        learner.meta_gradient(batch)
    return float(counter.get_total_flops()) * meta_batch


def peak_rate(threads: int, seconds: float = 2.0, device: str = "cpu") -> float:
    """The best FLOP/s of a 1024^3 float32 matrix product at ``threads`` threads (best of several; on a GPU,
    4096^3 without TF32, as metagrad computes)."""
    import torch

    torch.set_num_threads(threads)
    n = 1024 if device == "cpu" else 4096
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    a @ b
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _device_name(device: str) -> str:
    import torch

    return "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device))


def _run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any] | None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"  failed: {' '.join(cmd[:3])} ...: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        return None
    return json.loads(lines[-1])


def run_metagrad(spec: dict[str, Any]) -> dict[str, Any] | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    return _run([sys.executable, __file__, "--worker", json.dumps(spec)], env)


def in_child(call: str, *args: Any) -> float:
    """``count_flops(*args)`` or ``peak_rate(*args)`` in a fresh process (see :func:`worker`)."""
    got = _run([sys.executable, __file__, "--worker", json.dumps({"call": call, "args": list(args)})])
    if got is None:
        raise SystemExit(f"{call} failed")
    return float(got["value"])


def _kept_env() -> dict[str, str]:
    """glibc's environment variables for metagrad.allocator.keep_freed_memory's settings (older glibc refuses an
    mmap threshold above 32 MiB; 2.36, where this was measured, takes more)."""
    import platform

    version = tuple(int(v) for v in (platform.libc_ver()[1] or "0.0").split(".")[:2])
    mmap = 2**31 - 1 if version >= (2, 36) else 32 * 2**20
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_peer(args: argparse.Namespace, steps: int, threads: int, allocator: str, network: str = "pool"
             ) -> dict[str, Any] | None:  # fmt: skip
    """learn2learn's row: the shared peer script (its pooling CNN4), or for ``network="stride"`` the same loop on
    learn2learn's own Omniglot network (``peer_conv4_l2l_strided.py``)."""
    strided = Path(__file__).with_name("peer_conv4_l2l_strided.py")
    script = PEERS / "bench_conv4_l2l.py" if network == "pool" else strided
    cmd = [str(args.peer_python), str(script), "--threads", str(threads), "--steps", str(steps),
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--meta-batch", str(args.meta_batch)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PEERS_DIR": str(PEERS)}
    if allocator == "kept":
        env |= _kept_env()
    row = _run(cmd, env)
    if row is None:
        return None
    return {"it_per_s": row["it_per_s_median"], "first_s": row["first_call_s"], "peak_mib": row["peak_rss_mib"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ways", type=int, nargs="+", default=[5], help="classes per task (learn2learn: 5 only)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["auto", "vmap"])
    ap.add_argument("--meta-batch", type=int, default=META_BATCH)
    ap.add_argument("--queries", type=int, default=QUERIES, help="query images per class (the peers': 15)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (learn2learn's rows: the CPU only)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N meta-iterations of each row into --profile-out")
    ap.add_argument("--profile-out", default="conv4_profile_{path}_{steps}.txt",
                    help="({path}, {steps}: the row's)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per row (median)")
    ap.add_argument("--rounds", type=int, default=1, help="times each setting's rows run in turn")
    ap.add_argument("--diagnostics", action="store_true",
                    help="keep the pre-adaptation query loss (a query forward pass per task; the peer has none)")
    ap.add_argument("--no-peer", action="store_true", help="leave learn2learn out")
    ap.add_argument("--allocator", choices=("kept", "default"), nargs="+", default=["kept"],
                    help="metagrad's rows: freed memory kept, as metagrad train runs, or glibc's defaults")  # fmt: skip
    ap.add_argument("--peer-allocator", choices=("default", "kept"), nargs="+", default=["default"],
                    help="learn2learn's rows: glibc's defaults, or metagrad's kept settings")  # fmt: skip
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    ap.add_argument("--json", type=Path, help="write the rows and machine facts here")
    return ap.parse_args(argv)


def run_protocol(args: argparse.Namespace, ways: int, peer: bool) -> list[dict[str, Any]]:
    """Every (steps, threads) setting of one ``ways``-way protocol, printed as it goes; its rows."""
    rows: list[dict[str, Any]] = []
    print(f"Conv-4 {ways}-way {SHOTS}-shot, {args.queries} queries/class, meta-batch {args.meta_batch}, "
          f"{args.device}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    networks = {p: _network(p.split("+")[1:]) for p in args.paths}
    for steps in args.steps:
        flops = {n: in_child("count_flops", ways, steps, args.meta_batch, args.queries, args.device, n)
                 for n in sorted(set(networks.values()))}  # fmt: skip
        for threads in args.threads:
            rate = in_child("peak_rate", threads, 2.0, args.device)
            floor_s = {n: f / rate for n, f in flops.items()}
            for rnd in range(args.rounds):
                # the peer's rows by network and allocator: each metagrad row beside learn2learn on its network
                bases: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in flops}
                for network, allocator in ((n, a) for n in flops for a in (args.peer_allocator if peer else ())):
                    base = run_peer(args, steps, threads, allocator, network)
                    if base is not None:
                        bases[network][allocator] = base
                        name = "learn2learn" + (" OmniglotCNN" if network == "stride" else "")
                        rows.append({"impl": f"{name} ({allocator})", "ways": ways, "steps": steps,
                                     "threads": threads, "round": rnd, "allocator": allocator, "network": network,
                                     "vs_floor": floor_s[network] * base["it_per_s"], **base})  # fmt: skip
                for path in args.paths:
                    for allocator in args.allocator:
                        spec = {"path": path, "ways": ways, "steps": steps, "threads": threads,
                                "meta_batch": args.meta_batch, "warmup": args.warmup, "iters": args.iters,
                                "diagnostics": args.diagnostics, "allocator": allocator, "device": args.device,
                                "queries": args.queries, "profile": args.profile,
                                "profile_out": str(Path(args.profile_out).resolve())}  # fmt: skip
                        got = run_metagrad(spec)
                        if got is None:
                            continue
                        row = {"impl": f"metagrad {path} ({allocator})", "ways": ways, "steps": steps,
                               "threads": threads, "round": rnd, "allocator": allocator, **got}  # fmt: skip
                        # beside the peer on the same network and allocator where it ran on it, else on the first
                        same = bases[networks[path]]
                        base = same.get(allocator, next(iter(same.values()), None))
                        if base is not None:
                            row["vs_l2l"] = got["it_per_s"] / base["it_per_s"]
                        row["vs_floor"] = floor_s[networks[path]] * got["it_per_s"]
                        row["network"] = networks[path]
                        rows.append(row)
                        # (each row as it comes: a run stopped by a time limit keeps the rows it finished)
                        print(f"  done: {row['impl']} {got['it_per_s']:.3f} it/s, peak {got['peak_mib']:.0f} MiB, "
                              f"first {got['first_s']:.1f} s", flush=True)
            each = ", ".join(f"{n} {f / 1e9:.0f} GFLOP, floor {floor_s[n]:.2f} s/it" for n, f in flops.items())
            print(f"\nsteps {steps}, threads {threads}: per iteration {each}; peak {rate / 1e9:.0f} GF/s; "
                  f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
            print(f"  {'implementation':<32} {'it/s':>7} {'s/it':>7} {'vs l2l':>7} {'vs floor':>8} {'peak MiB':>9}"
                  f" {'steady':>7} {'first_s':>8}")  # fmt: skip
            nan = float("nan")
            for r in rows:
                if r["steps"] == steps and r["threads"] == threads:
                    print(f"  {r['impl']:<32} {r['it_per_s']:7.3f} {1 / r['it_per_s']:7.2f} "
                          f"{r.get('vs_l2l', nan):7.2f} {r.get('vs_floor', nan):8.2f} "
                          f"{r['peak_mib']:9.0f} {r.get('steady_mib', nan):7.0f} {r['first_s']:8.1f}")  # fmt: skip
            for r in rows:  # what the target (2x the peer) asks of the floor: above 1 is beyond it
                if r["steps"] == steps and r["threads"] == threads and r["impl"].startswith("learn2learn"):
                    print(f"  2x {r['impl']}: {2 * r['it_per_s']:.3f} it/s, {2 * r['vs_floor']:.2f} of the floor")
            for r in rows:
                if r["steps"] == steps and r["threads"] == threads:
                    n = r["network"]
                    r.update(gflop=flops[n] / 1e9, peak_gflops=rate / 1e9, floor_s=floor_s[n])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.no_peer = args.no_peer or args.device != "cpu"  # (the peer's script runs on the CPU)
    peer_found = args.peer_python.exists() and (PEERS / "bench_conv4_l2l.py").exists()
    if not args.no_peer and 5 in args.ways and not peer_found:
        print(f"learn2learn not found ({args.peer_python}): run `bash ../shared/peers/setup.sh` or pass --no-peer")
        return 2
    rows: list[dict[str, Any]] = []
    for ways in args.ways:
        rows += run_protocol(args, ways, peer=not args.no_peer and ways == 5)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        ways = "+".join(str(w) for w in args.ways)
        payload = {"protocol": f"conv4-{ways}w1s-q{args.queries}-mb{args.meta_batch}", "cpu": os.cpu_count(),
                   "device": _device_name(args.device),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
