"""A whole sinusoid training iteration, as ``metagrad train`` runs it, beside JAX (jit + vmap) in the same run.

Run from the repository root (JAX's virtual environment from ``bash ../shared/peers/setup.sh``)::

    python benchmarks/iteration.py                       # MAML, 1 and 5 inner steps, 1 thread
    python benchmarks/iteration.py --steps 1 --seconds 3 --no-peer
    python benchmarks/iteration.py --no-peer --device cuda --compile-mode reduce-overhead   # CUDA graphs on a GPU
    python benchmarks/iteration.py --no-peer --steps 1 --profile 50 --profile-out prof.txt  # where the time goes
    python benchmarks/iteration.py --no-peer --steps 1 --profile 200 --kernels              # ... kernel by kernel
    python benchmarks/iteration.py --algorithm cavia --update fused separate    # another preset, both updates
    python benchmarks/iteration.py --steps 1 --unguarded       # ... and the cost of Dynamo's guard checks
    python benchmarks/iteration.py --steps 1 --bare            # ... and the compiled update alone

Protocol (the peer's ``../shared/peers/bench_jax.py``): sinusoid MAML, 1-40-40-1 ReLU MLP, meta-batch 25,
K = 10 support and 10 query points, inner SGD at lr 0.01, second order, Adam 1e-3. One iteration is
:meth:`metagrad.Trainer.step` on the shipped ``configs/sinusoid/maml.toml`` with ``train.compile = true``:
sample the tasks from the trainer's generator, the meta-gradient, the divergence guard and clipping check, the
Adam and scheduler steps, the metrics (logging every ``log_every`` iterations is left at its default). JAX's is
one jitted function doing the same (sampling, inner loops, meta-gradient, a hand-written Adam step). Both on one
core (``taskset -c 0``); each row in a fresh process, one after another; ``vs JAX`` is the ratio of medians.
``first_s`` is the first iteration (compilation, cold caches for metagrad's Inductor: a fresh cache folder).

``--algorithm`` runs another sinusoid preset (``configs/sinusoid/<name>.toml``, compiled) instead of MAML; the
JAX peer implements MAML only, so its row is then left out. ``--update`` chooses ``train.fused_update``: ``fused``
(the default: the whole update in one compiled call, :mod:`metagrad.fused_update`) and/or ``separate``, one
row each, so that ``--update fused separate`` shows what fusing is worth for that algorithm.

``--unguarded`` adds a diagnostic row: in the same process, right after the timed blocks (always second, so a
drift of the machine within the row would bias it), the same steps again
without Dynamo's guard checks (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), i.e. what the checks
that keep the compiled step in step with the Python state cost per iteration. Unsafe (a changed setting would run
a stale graph), so never how ``metagrad train`` runs: it shows how much of the gap to JAX, whose jit checks no
Python state, those checks are.

``--bare`` adds another diagnostic row, also after the timed blocks: the compiled update alone, called with the
arguments the trainer last gave it and each iteration's fresh task draws, then the scheduler's step and one host
copy of the metrics. What it leaves out is the Python that keeps each step safe and honest (the learner's and the
optimizer's settings checked, the parameters read by name, the Adam state gathered, the metrics logged): the
row is the ceiling of any driver around this compiled update (the sinusoid MAML presets, whose tasks are assembled
inside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "peers"))
JAX_PYTHON = Path(os.environ.get("PEERS_VENVS", "/tmp")) / "peers-venv-jax" / "bin" / "python"


def profile_steps(trainer: Any, steps: int, out: Path) -> None:
    """``torch.profiler`` over ``steps`` calls of ``trainer.step()``, written to ``out``: the busiest operators,
    and per step the kernel launches, CUDA-graph replays and host synchronisations (what decides whether a GPU
    step is launch-bound and whether its CUDA graphs are replayed at all)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
    events = prof.key_averages()
    calls = {e.key: e.count for e in events}
    # Kernel launches go through several runtime and driver entry points (cudaLaunchKernelExC, cuLaunchKernelEx,
    # ... by version): counted together; a replayed CUDA graph is one cudaGraphLaunch.
    launches = sum(n for k, n in calls.items() if k.startswith(("cudaLaunch", "cuLaunch")))
    counted = ("cudaGraphLaunch", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
               "aten::_local_scalar_dense", "aten::item")  # fmt: skip
    lines = [f"{steps} Trainer.step calls; per step:", f"  {'kernel launches':<28} {launches / steps:8.1f}"]
    lines += [f"  {name:<28} {calls.get(name, 0) / steps:8.1f}" for name in counted]
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
    out.write_text("\n".join(lines) + "\n")


def worker(
    steps: int, seconds: float, device: str = "cpu", mode: str = "default", profile: int = 0,
    profile_out: Path | None = None, kernels: bool = False, algorithm: str = "maml", fused: bool = True,
    unguarded: bool = False, compiled: bool = True, bare: bool = False,
) -> dict[str, Any]:  # fmt: skip
    import torch

    if kernels:  # each of Inductor's CPU kernels a row of its own in the profile (it costs a little on every call)
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True

    from metagrad import Trainer
    from metagrad.presets import preset

    torch.set_num_threads(1)
    cfg = preset(algorithm)
    cfg.algorithm.inner_steps = steps
    cfg.train.fused_update = fused
    cfg.train.compile, cfg.train.threads, cfg.train.iterations = compiled, 1, 10**9
    cfg.train.device, cfg.train.compile_mode = device, mode
    cfg.train.val_every = cfg.train.checkpoint_every = 10**9  # iterations only: no validation or checkpoint
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d) / "run")
        t0 = time.perf_counter()
        trainer.step()
        first = time.perf_counter() - t0
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            trainer.step()
        blocks = _rates(trainer, seconds)
        unchecked = None
        if unguarded:  # diagnostic only: the cached graph runs without Dynamo checking the Python state
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                unchecked = statistics.median(_rates(trainer, seconds))
        alone = _bare_rates(trainer, seconds) if bare else None
        if profile and profile_out is not None:
            try:  # the timing above must come back even if the profiler fails on this machine
                profile_steps(trainer, profile, profile_out)
            except Exception as e:  # noqa: BLE001
                profile_out.write_text(f"profiling failed: {type(e).__name__}: {e}\n")
        fused_used = trainer._fused is not None
        graphs = None if trainer._fused is None else trainer._fused.graphs
        update = trainer.update
        trainer.close()
    out = {"it_per_s": statistics.median(blocks), "first_s": first, "fused": fused_used, "update": update}
    if graphs is not None:  # the update replayed from metagrad's CUDA graphs (train.cuda_graphs)
        out |= {"cuda_graphs": graphs.captures, "cuda_graphs_failed": graphs.failed}
    if unchecked is not None:
        out["unguarded_it_per_s"] = unchecked
    if isinstance(alone, str):
        out["bare_skipped"] = alone
    elif alone is not None:
        out["bare_it_per_s"] = statistics.median(alone)
    return out


def _bare_rates(trainer: Any, seconds: float) -> list[float] | str:
    """Iterations per second of the compiled update alone (``--bare``), in blocks as :func:`_rates`; or why this
    row has no such update to time (the row's own timing stands)."""
    import torch

    fused = trainer._fused
    if fused is None or fused.graphs is not None or trainer.learner._compiled is None:
        return "no fused compiled update on the CPU"
    if trainer.learner.random:  # (its draws and their generator state would be left out of the timing)
        return "the learner draws random numbers of its own"
    compiled, captured = fused._compiled, {}

    def spy(*args: Any) -> Any:
        captured["args"] = args
        return compiled(*args)

    fused._compiled = spy
    try:
        trainer.step()
    finally:
        fused._compiled = compiled
    args = captured["args"]
    if args[4] is None:  # (sizes: only a family that assembles its tasks inside the update has them)
        return "the tasks are not assembled inside the compiled update"
    if args[8]:  # the learner's own draws at each step (Reptile's inner batches): not redrawn here
        return "the learner draws at each step"
    family, size, shots, queries = args[4]
    before, after = args[:3], args[4:]

    def step() -> None:
        values = family.draw(size, shots, queries, trainer.generator)
        with torch.no_grad():
            out, _ = compiled(*before, values, *after)
        out.tolist()
        trainer.scheduler.step()

    blocks = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            step()
            n += 1
        blocks.append(n / (time.perf_counter() - t0))
    return blocks


def _rates(trainer: Any, seconds: float) -> list[float]:
    """Iterations per second in 5 blocks of ``seconds / 5`` (medians of blocks: one iteration is well under a
    millisecond, below the timer's useful resolution)."""
    blocks = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            trainer.step()
            n += 1
        blocks.append(n / (time.perf_counter() - t0))
    return blocks


def _json_line(cmd: list[str], env: dict[str, str]) -> dict[str, Any] | None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"  failed: {cmd[1]}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where Trainer.step runs (JAX: CPU)")
    ap.add_argument("--compile-mode", default="default",
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))  # fmt: skip
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N steps of each row into --profile-out ({steps}: the row's steps)")
    ap.add_argument("--profile-out", default="iteration_profile_{steps}.txt")
    ap.add_argument("--kernels", action="store_true",
                    help="compile with Inductor's kernel profiling, so that --profile lists each CPU kernel (the "
                         "rows' rates then include its small cost)")  # fmt: skip
    ap.add_argument("--algorithm", default="maml", help="a sinusoid preset (the JAX peer runs MAML only)")
    ap.add_argument("--update", nargs="+", choices=("fused", "separate"), default=["fused"],
                    help="train.fused_update: one row each")  # fmt: skip
    ap.add_argument("--compile", nargs="+", choices=("on", "off"), default=["on"],
                    help="train.compile: one row each (off on a GPU: the eager update in metagrad's CUDA graphs)")
    ap.add_argument("--unguarded", action="store_true",
                    help="also time each row's steps without Dynamo's guard checks (unsafe; diagnostic row)")
    ap.add_argument("--bare", action="store_true",
                    help="also time the compiled update alone, without the driver's checks (diagnostic row)")
    ap.add_argument("--jax-python", type=Path, default=JAX_PYTHON)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.worker is not None:
        out = Path(args.profile_out.format(steps=args.worker))
        got = worker(args.worker, args.seconds, args.device, args.compile_mode, args.profile, out, args.kernels,
                     args.algorithm, args.update == ["fused"], args.unguarded, args.compile == ["on"],
                     args.bare)  # fmt: skip
        print(json.dumps(got))
        return 0
    peer = not args.no_peer and args.algorithm == "maml"
    if peer and not (args.jax_python.exists() and (PEERS / "bench_jax.py").exists()):
        print(f"JAX not found ({args.jax_python}): run `bash ../shared/peers/setup.sh` or pass --no-peer")
        return 2
    pin = ["taskset", "-c", "0"]
    rows = []
    print(f"sinusoid {args.algorithm}, whole training iteration, 1 core; load average {os.getloadavg()[0]:.2f}")
    print(f"  {'implementation':<40} {'steps':>5} {'it/s':>8} {'vs JAX':>7} {'first_s':>8}")
    for steps in args.steps:
        base = None
        if peer:
            iters = max(100, int(args.seconds * 600 / steps))
            cmd = [*pin, str(args.jax_python), str(PEERS / "bench_jax.py"), "--steps", str(steps), "--threads", "1",
                   "--iters", str(iters), "--out", os.devnull]  # fmt: skip
            row = _json_line(cmd, dict(os.environ))
            if row is not None:
                base = {"impl": row["impl"], "steps": steps, "it_per_s": row["its_per_s_median"],
                        "first_s": row["compile_s"]}  # fmt: skip
                rows.append(base)
        for update, compiled in ((u, c) for c in args.compile for u in args.update):
            with tempfile.TemporaryDirectory() as cache:  # a cold Inductor compile, as a first run meets it
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
                cmd = [*pin, sys.executable, __file__, "--worker", str(steps), "--seconds", str(args.seconds),
                       "--device", args.device, "--compile-mode", args.compile_mode, "--profile", str(args.profile),
                       "--profile-out", str(Path(args.profile_out).resolve()), "--algorithm", args.algorithm,
                       "--update", update, "--compile", compiled]  # fmt: skip
                cmd += ["--kernels"] if args.kernels else []
                cmd += ["--unguarded"] if args.unguarded else []
                cmd += ["--bare"] if args.bare else []
                got = _json_line(cmd, env)
            if got is not None:
                impl = "metagrad Trainer.step"
                if compiled == "off":
                    impl += " (eager)" if args.device == "cpu" else f" ({args.device}, eager)"
                else:
                    impl += "" if args.device == "cpu" else f" ({args.device}, {args.compile_mode})"
                if got.get("cuda_graphs_failed"):
                    impl += " (graph capture failed)"
                elif got.get("cuda_graphs"):
                    impl += " + graphs"
                if args.update != ["fused"] or not got["fused"]:  # which update ran (fused where it applies)
                    impl += " (fused)" if got["fused"] else " (separate)"
                row = {"impl": impl, "steps": steps, "algorithm": args.algorithm, "update": update,
                       "compile": compiled, **got}  # fmt: skip
                if base is not None:
                    row["vs_jax"] = got["it_per_s"] / base["it_per_s"]
                rows.append(row)
                if "unguarded_it_per_s" in got:
                    bare = {"impl": impl + ", no guard checks", "steps": steps, "algorithm": args.algorithm,
                            "update": update, "it_per_s": got["unguarded_it_per_s"], "first_s": None,
                            "diagnostic": "skip_guard_eval_unsafe"}  # fmt: skip
                    if base is not None:
                        bare["vs_jax"] = bare["it_per_s"] / base["it_per_s"]
                    rows.append(bare)
                if "bare_skipped" in got:
                    print(f"  (--bare: no row for {impl}: {got['bare_skipped']})")
                if "bare_it_per_s" in got:
                    alone = {"impl": "the compiled update alone", "steps": steps, "algorithm": args.algorithm,
                             "update": update, "it_per_s": got["bare_it_per_s"], "first_s": None,
                             "diagnostic": "bare"}  # fmt: skip
                    if base is not None:
                        alone["vs_jax"] = alone["it_per_s"] / base["it_per_s"]
                    rows.append(alone)
        for r in rows:
            if r["steps"] == steps:
                first = "" if r["first_s"] is None else f"{r['first_s']:8.1f}"
                print(f"  {r['impl']:<40} {steps:>5} {r['it_per_s']:8.0f} {r.get('vs_jax', float('nan')):7.2f} "
                      f"{first:>8}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"protocol": f"sinusoid-{args.algorithm}-mb25-k10", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
