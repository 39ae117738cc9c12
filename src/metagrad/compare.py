"""``metagrad compare``: every algorithm on the same task stream and budget, scored on the same test tasks.

Each algorithm is an ordinary run in ``OUT/<algorithm>/`` (so it can be evaluated, resumed or plotted on its
own); the comparison writes ``report.md``, ``results.json``, ``adaptation.png`` and ``fits.png`` beside them.
On the CPU the runs are spread over worker processes with one thread each.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metagrad.checkpoint import read_json, write_atomic
from metagrad.errors import ConfigError, MetagradError, RunError

__all__ = ["compare", "report_table", "redraw", "COMPARE_FORMAT"]

COMPARE_FORMAT = "metagrad-compare/1"
REPORT_STEPS = (1, 10)


def config_for(
    algorithm: str,
    budget: str,
    task: str,
    base: dict[str, Any] | None = None,
    data: str | None = None,
    overrides: Sequence[str] = (),
) -> Any:
    """The run config of ``algorithm``: the shipped preset of ``task`` under ``budget``, or ``base`` (a user's
    config, as a dict) with the algorithm switched to ``algorithm`` (its own defaults, plus the keys ``base``
    set that it has). ``data`` is the data set's folder (``task.data``), for benchmarks that read one.
    ``overrides`` (``section.key=value``) go on top of the preset; an ``algorithm.*`` key applies to the
    algorithms that have it."""
    from metagrad.config import apply_overrides, config_from_dict
    from metagrad.presets import preset

    if base is None:
        cfg = preset(algorithm, budget, task)
        for item in overrides:
            dotted = item.split("=", 1)[0].strip()
            if dotted.startswith("algorithm.") and dotted.split(".", 1)[1] not in cfg.algorithm.keys:
                continue
            cfg = apply_overrides(cfg, [item])
    else:
        cfg = config_from_dict({**base, "algorithm": {**base.get("algorithm", {}), "name": algorithm}})
    if data is not None:
        if "data" not in cfg.task.keys:
            raise ConfigError(f"--data: task {cfg.task.name!r} reads no data set (it has no task.data)")
        cfg.task.data = str(data)
    return cfg.validate()


def run_name(algorithm: str) -> str:
    """The run directory of an algorithm in a comparison: its registered name (an import path's class too)."""
    from metagrad.registry import resolve

    return resolve("algorithm", algorithm).name


def _train_and_eval(
    algorithm: str,
    budget: str,
    out: str,
    device: str,
    tasks: int | None,
    progress: Any,
    task: str = "sinusoid",
    base: dict[str, Any] | None = None,
    data: str | None = None,
    overrides: Sequence[str] = (),
    checkpoint: str = "latest",
    task_threads: int = 1,
) -> dict:
    import torch

    from metagrad.build import DTYPES, build_task, resolve_device
    from metagrad.evaluate import evaluate, set_bn_statistics
    from metagrad.train import train

    cfg = config_for(algorithm, budget, task, base, data, overrides)
    cfg.train.device = device
    if tasks is not None:
        cfg.eval.tasks = tasks
    dev = resolve_device(device)
    if dev.type == "cpu":
        # One intra-op thread, so that results do not depend on the machine's cores or the workers; the cores
        # that the workers leave free run whole tasks side by side (metagrad.task_threads), which gives the
        # one-thread loop's numbers to the bit.
        cfg.train.threads = 1
        torch.set_num_threads(1)
        if cfg.train.task_threads == "auto":
            cfg.train.task_threads = task_threads

    parent = os.getppid()

    def report(iteration: int, _: dict[str, float]) -> None:
        if os.getppid() != parent:  # the comparison was killed: stop instead of training on as an orphan
            raise SystemExit(1)
        if progress is not None:
            try:
                progress[algorithm] = iteration
            except (OSError, EOFError):  # the progress manager went away with the parent
                raise SystemExit(1) from None

    run_dir = Path(out) / run_name(algorithm)
    result = train(cfg, run_dir, overwrite=True, progress=False, callback=report)
    learner, scored_at = result.learner, result.iterations
    if checkpoint == "best":  # early stopping on the validation tasks, as MAML++ reports
        from metagrad.run import load_learner

        _, learner, meta = load_learner(run_dir, "best", dev)
        scored_at = int(meta.get("iteration", scored_at))
    ev = cfg.eval
    family = build_task(cfg, "test")
    dtype = DTYPES[cfg.train.dtype]
    set_bn_statistics(learner, ev.bn_statistics)
    scores = evaluate(learner, family, ev.shots, ev.steps, ev.tasks, ev.scoring, dev, dtype, queries=cfg.task.queries)
    return {
        **scores,
        "scored_iteration": scored_at,
        "iterations": result.iterations,
        "train_seconds": result.seconds,
        "iterations_per_second": result.iterations / result.seconds if result.seconds else None,
        "inner_steps_train": getattr(cfg.algorithm, "inner_steps", 0),
    }


def _cell(r: dict[str, Any], step: int) -> str:
    if "accuracy" in r:
        return f"{100 * r['accuracy'][step]:.1f} ± {100 * r['ci95'][step]:.1f} %"
    key = next(k for k in r if k not in ("shots", "steps", "ci95", "diverged"))  # the metric: mse, or a user's
    m, c = r[key][step], r["ci95"][step]
    if not m < 1e6:
        return f"{m:.2g} (diverged)"
    return f"{m:.3f} ± {c:.3f}" if m >= 0.01 else f"{m:.1e} ± {c:.0e}"


def report_table(results: Sequence[dict[str, Any]]) -> str:
    """The side-by-side Markdown table: MSE ± 95 % CI after 1 and 10 steps per shot count, time, speed.

    An algorithm without an inner loop (ProtoNets: one point, step 0) shows its score once, in the last column,
    and "—" in the others: it has no adaptation curve to read at 1 step."""
    shots = [r["shots"] for r in results[0]["results"]]
    last = max(res["results"][0]["steps"][-1] for res in results)
    steps = [s for s in REPORT_STEPS if s < last] + [last]
    head = ["algorithm"] + [f"{k}-shot, {s} step{'' if s == 1 else 's'}" for k in shots for s in steps]
    head += ["train time (s)", "meta-it/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        cells = [res["algorithm"]]
        for k in shots:
            r = next(x for x in res["results"] if x["shots"] == k)
            if r["steps"][-1] == 0 < last:
                cells += ["—"] * (len(steps) - 1) + [_cell(r, 0) + " (no inner loop)"]
                continue
            cells += [_cell(r, s) for s in steps]
        ips = res.get("iterations_per_second")
        cells += [f"{res['train_seconds']:.0f}", f"{ips:.3g}" if ips else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_outputs(out: Path, results: list[dict[str, Any]], header: str) -> None:
    from metagrad.plots import plot_curves

    table = report_table(results)
    r0 = results[0]
    metric = r0.get("metric", "mse")
    what = f"{r0.get('ways')}-way query accuracy" if metric == "accuracy" else metric.replace("mse", "MSE")
    notes = [
        f"Test set: {r0['tasks']} fixed tasks per shot count, {r0['scoring']} scoring; {what} ± 95% CI (1.96·σ/√n).",
        "Learned per-step rates (MAML Enhanced) stop after their trained steps: later steps leave the weights be.",
    ]
    single = [res["algorithm"] for res in results if res["results"][0]["steps"][-1] == 0]
    if single:
        notes.append(f"{', '.join(single)}: no inner loop, so one score (step 0), shown in the last column.")
    for res in results:
        for r in res["results"]:
            bad = [d for d in r.get("diverged", []) if d]
            if bad:
                notes.append(f"{res['algorithm']}, {r['shots']}-shot: adaptation diverged on {max(bad)} test task(s).")
    write_atomic(out / "report.md", f"{header}\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    plot_curves(results, out / "adaptation.png", title=f"{r0['task']}: adaptation on {r0['tasks']} test tasks")
    redraw_fits(out, [r["algorithm"] for r in results])


def redraw_fits(out: Path, algorithms: Sequence[str]) -> Path | None:
    """fits.png, for task families that can draw their curves (``curve``; see metagrad.tasks.TaskDistribution)."""
    from metagrad.build import build_task
    from metagrad.plots import plot_fits
    from metagrad.run import load_learner, read_run_config

    # The registered class answers, not a built family: building Omniglot or images would read the data set.
    if not hasattr(read_run_config(out / run_name(algorithms[0])).task.component.target, "curve"):
        return None
    pairs = []
    for a in algorithms:
        cfg, learner, _ = load_learner(out / run_name(a))
        pairs.append((learner, build_task(cfg)))
    return plot_fits(pairs, out / "fits.png", shots=5, steps=10)


def redraw(out: str | Path) -> list[Path]:
    """``metagrad plot`` of a comparison directory: redraw both figures from results.json and the runs."""
    from metagrad.plots import plot_curves

    out = Path(out)
    data = read_json(out / "results.json")
    if data.get("format") != COMPARE_FORMAT:
        raise RunError(f"{out / 'results.json'} is not a metagrad comparison")
    results = data["results"]
    plot_curves(results, out / "adaptation.png")
    fits = redraw_fits(out, [r["algorithm"] for r in results])
    return [out / "adaptation.png"] + ([fits] if fits is not None else [])


def compare(
    algorithms: Sequence[str],
    budget: str = "default",
    out: str | Path = "runs/compare",
    *,
    device: str = "auto",
    overwrite: bool = False,
    workers: int | None = None,
    tasks: int | None = None,
    progress: bool = True,
    task: str = "sinusoid",
    base: Any = None,
    data: str | Path | None = None,
    overrides: Sequence[str] = (),
    checkpoint: str = "latest",
) -> list[dict[str, Any]]:
    """Train and evaluate ``algorithms`` under one budget; write the report and figures into ``out``.

    ``base`` compares them on a user's config (task, model, training) instead of a shipped benchmark's presets:
    the nested dict of what the user set (:func:`metagrad.config.raw_config`), or a whole Config. ``data`` points
    an image benchmark (``task="miniimagenet"``) at the data set's folder (``task.data``). ``overrides``
    (``section.key=value``, with the shipped presets only) change the benchmark, e.g. ``task.ways=20``.
    ``checkpoint="best"`` scores each algorithm at its best validation checkpoint instead of its last."""
    if checkpoint not in ("latest", "best"):
        raise ConfigError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")
    from metagrad.build import build_task, resolve_device
    from metagrad.config import Config
    from metagrad.presets import COMPARE_ALGORITHMS

    # Only the keys the user set: a Config holds every default, which would pin the algorithms' own.
    base_dict = base.to_dict() if isinstance(base, Config) else base
    if base_dict is not None:
        task = base_dict.get("task", {}).get("name", "sinusoid")

    data = None if data is None else str(data)

    def preset(a: str, budget: str, task: str) -> Any:
        return config_for(a, budget, task, base_dict, data, overrides)

    for a in algorithms:
        preset(a, budget, task)  # validates the names, with a suggestion
    if not algorithms:
        raise ConfigError(f"--algorithms needs at least one of {', '.join(COMPARE_ALGORITHMS)}")
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError("--algorithms lists an algorithm twice")
    out = Path(out)
    marker = out / "compare.json"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not marker.is_file():
            raise RunError(f"output directory {str(out)!r} is not empty and is not a metagrad comparison")
        if not overwrite:
            raise RunError(f"output directory {str(out)!r} already holds a comparison; pass --overwrite to replace it")
    dev = resolve_device(device)  # before anything is written
    for a in algorithms:
        build_task(preset(a, budget, task), "test")  # e.g. a missing Omniglot folder: refuse before writing
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(
        marker, json.dumps({"format": COMPARE_FORMAT, "algorithms": list(algorithms), "budget": budget, "task": task})
    )
    from metagrad.task_threads import usable_cores

    cores = usable_cores()
    n_workers = workers or (1 if dev.type == "cuda" else max(1, min(len(algorithms), cores)))
    task_threads = max(1, cores // n_workers)  # (on the CPU: the cores each worker may run tasks on)

    start = time.perf_counter()
    manager = mp.get_context("spawn").Manager()
    shared = manager.dict({a: 0 for a in algorithms})
    bars = {
        a: tqdm(total=preset(a, budget, task).train.iterations, desc=f"{a:>13}", position=i, disable=not progress,
                unit="it", dynamic_ncols=True, leave=True)
        for i, a in enumerate(algorithms)
    }  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    try:
        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
            # Longest first (most inner steps), so that no long run starts last and leaves a worker idle.
            order = sorted(algorithms, key=lambda a: -getattr(preset(a, budget, task).algorithm, "inner_steps", 0))
            futures = {
                pool.submit(_train_and_eval, a, budget, str(out), str(dev), tasks, shared, task, base_dict, data,
                            list(overrides), checkpoint, task_threads): a
                for a in order
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for a, bar in bars.items():
                    bar.n = shared.get(a, 0)
                    bar.refresh()
                for f in done:
                    a = futures[f]
                    try:
                        results[a] = f.result()
                    except Exception as e:  # one failed run must not cost the others' results
                        failures[a] = f"{type(e).__name__}: {e}"
                        bars[a].set_postfix_str("failed")
                        continue
                    bars[a].n = bars[a].total
                    bars[a].set_postfix_str("evaluated")
    finally:
        for bar in bars.values():
            bar.close()
        manager.shutdown()
    ordered = [results[a] for a in algorithms if a in results]
    if not ordered:
        raise MetagradError(
            "every run of the comparison failed: " + "; ".join(f"{a}: {e}" for a, e in failures.items())
        )
    wall = time.perf_counter() - start
    header = (
        f"# metagrad compare: {task}, budget `{budget}`\n\n"
        f"Command: `metagrad compare --task {task} --budget {budget} --algorithms {' '.join(algorithms)}"
        f"{' --checkpoint best' if checkpoint == 'best' else ''}{''.join(' ' + o for o in overrides)}`; "
        f"wall time {wall:.0f} s with {n_workers} worker(s) on {dev.type}."
    )
    payload = {
        "format": COMPARE_FORMAT,
        "task": task,
        "budget": budget,
        "overrides": list(overrides),
        "checkpoint": checkpoint,
        "wall_seconds": wall,
        "device": str(dev),
        "failures": failures,
        "results": ordered,
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    if failures:
        header += "\n\nFailed runs (not in the table): " + "; ".join(f"{a}: {e}" for a, e in failures.items())
    _write_outputs(out, ordered, header)
    return ordered
