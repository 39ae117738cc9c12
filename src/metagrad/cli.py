"""The ``metagrad`` command: ``train``, ``eval``, ``compare``, ``plot``, ``adapt`` and ``data``.

Bad input exits with code 2 and one line saying what is wrong; a diverged run exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --task must never be read as an abbreviation of --tasks
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
        return value

    return parse


_positive, _non_negative = _integer(1), _integer(0)


def build_parser() -> argparse.ArgumentParser:
    from metagrad import presets

    p = _Parser(prog="metagrad", description="Vectorised gradient-based meta-learning on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train", help="meta-train one algorithm", description="Meta-train one algorithm into a run directory."
    )
    t.add_argument("--config", type=Path, help="TOML config (e.g. configs/sinusoid/maml.toml); defaults otherwise")
    t.add_argument("--out", type=Path, help="run directory (default runs/<algorithm>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    t.add_argument("--compile", action="store_true", help="run the meta-step through torch.compile")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.iterations=1000"
    )

    e = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a trained run on fixed test tasks.")
    e.add_argument("run", type=Path, help="run directory written by `metagrad train`")
    e.add_argument("--shots", type=_positive, nargs="+", help="support sizes K (default from the run: 5 10 20)")
    e.add_argument("--steps", type=_positive, help="inner steps 0..N (default 10)")
    e.add_argument("--tasks", type=_positive, help="number of test tasks (default 600)")
    e.add_argument("--scoring", choices=["dense", "paper"], help="dense: 100-point grid (default); paper: K points")
    e.add_argument("--checkpoint", default="latest", help="latest (default), best, or a checkpoint directory")
    e.add_argument(
        "--benchmark", choices=["tasks", "omniglot-runs"], default="tasks",
        help="tasks: fixed test tasks of the run's family (default); omniglot-runs: Lake et al.'s 20 one-shot runs",
    )  # fmt: skip
    e.add_argument("--data", type=Path, help="Omniglot folder holding all_runs.zip (default: the run's task.data)")
    e.add_argument(
        "--bn-statistics", choices=["batch", "running"],
        help="per-step batch norm: normalise query images with the query batch's statistics (MAML++, default) "
        "or the running ones (each query on its own)",
    )  # fmt: skip
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    e.add_argument("--json", type=Path, help="write the results as JSON")
    e.add_argument("--plot", type=Path, help="write a PNG: MSE against steps and example fits")

    c = sub.add_parser(
        "compare", help="train and compare every algorithm",
        description="Train every algorithm on the same sinusoid task stream and budget, evaluate all of them on the "
        "same test tasks, and write report.md, results.json, adaptation.png and fits.png.",
    )  # fmt: skip
    # --task is checked in the command, not by choices=: reading configs/ here would break every command
    # (even --help) of an install without them.
    c.add_argument(
        "--task", default=None,
        help=f"a shipped benchmark, configs/<task>/ (default {presets.DEFAULT_TASK}); with overrides and no "
        "--config, they change that benchmark's presets (e.g. --task omniglot task.ways=20)",
    )  # fmt: skip
    c.add_argument("--budget", default="default", help="default (sinusoid: ~3 min on 2 CPU cores), paper, cpu, tiny")
    c.add_argument(
        "--checkpoint", choices=("latest", "best"), default="latest",
        help="score each algorithm at its last checkpoint (default) or its best on the validation tasks",
    )  # fmt: skip
    c.add_argument(
        "--algorithms", nargs="+", metavar="NAME",
        help="default: the benchmark's list (configs/<task>/benchmark.toml); any registered algorithm",
    )  # fmt: skip
    c.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory (default runs/compare)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing comparison in --out")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument("--tasks", type=_positive, help="test tasks per shot count (default 600)")
    c.add_argument("--workers", type=_positive, help="parallel training processes (default: one per CPU core)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--data", type=Path, help="the data set's folder (task.data) of an image benchmark")
    c.add_argument(
        "--config", type=Path,
        help="compare on this run config (e.g. your own task and model) instead of a shipped benchmark; each "
        "algorithm runs with its own defaults and the keys the file sets",
    )  # fmt: skip
    c.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of --config")

    a = sub.add_parser(
        "adapt", help="adapt a trained run to your points and predict",
        description="Adapt a trained run to the support points of a new task and write its predictions on query "
        "points (the command-line form of learner.adapt and learner.predict). Files: CSV, .npy or .npz (see "
        "metagrad.pointfiles).",
    )  # fmt: skip
    a.add_argument("run", type=Path, help="a run directory")
    a.add_argument("--support", type=Path, required=True, help="support points: inputs then the target per row")
    a.add_argument("--query", type=Path, required=True, help="query inputs, one point per row")
    a.add_argument("--steps", type=_non_negative, help="inner steps (default: the run's)")
    a.add_argument("--out", type=Path, help="CSV or .npy of predictions (default: CSV on standard output)")
    a.add_argument("--checkpoint", default="latest", help="latest, best, or a checkpoint name")

    d = sub.add_parser(
        "data", help="show what an image data set holds",
        description="Read an image data set as training would (decoding it into the cache under METAGRAD_CACHE, "
        "default ~/.cache/metagrad) and print its layout, classes and images per split, image sizes and channels.",
    )  # fmt: skip
    d.add_argument("dir", type=Path, help="the data set's folder (what task.data names)")
    d.add_argument(
        "--layout", default="auto",
        choices=["auto", "imagefolder", "split_folders", "csv", "pickle", "omniglot"], help="default: recognised",
    )  # fmt: skip
    d.add_argument("--image-size", type=_positive, default=84, help="side images are resized to (default 84)")
    d.add_argument("--channels", type=int, choices=[0, 1, 3], default=0, help="0: as the data (default), 1 or 3")
    d.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="class ratios (no split)")
    d.add_argument("--workers", type=_non_negative, default=0, help="decoding processes (default: one per core)")

    pl = sub.add_parser("plot", help="redraw figures", description="Redraw the figures of a run or comparison.")
    pl.add_argument("run", type=Path, help="a run directory or a `metagrad compare` directory")
    pl.add_argument("--out", type=Path, help="PNG path for a run (default RUN/eval.png)")
    return p


def _cmd_compare(args: argparse.Namespace) -> int:
    from metagrad.compare import compare
    from metagrad.presets import DEFAULT_TASK, compare_algorithms, tasks

    out = args.out
    base = None
    preset_overrides: list[str] = []
    if args.config is not None or (args.overrides and args.task is None):
        # A user's own config (a file, or overrides such as task.name=...): each algorithm on it.
        from metagrad.config import raw_config

        base = raw_config(args.config, args.overrides)  # only what the file and overrides set
        if not args.algorithms:
            raise _usage("compare --config needs --algorithms A B ...")
    else:
        args.task = args.task or DEFAULT_TASK
        known = tasks()
        if args.task not in known:
            raise _usage(f"argument --task: unknown benchmark {args.task!r}; choose from {', '.join(known)}")
        preset_overrides = list(args.overrides)  # on top of the benchmark's presets
    task = args.task or DEFAULT_TASK
    chosen = list(args.algorithms or compare_algorithms(task))
    results = compare(
        chosen, args.budget, out, device=args.device, overwrite=args.overwrite,
        workers=args.workers, tasks=args.tasks, progress=not args.no_progress, task=task, base=base,
        data=args.data, overrides=preset_overrides, checkpoint=args.checkpoint,
    )  # fmt: skip
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, results.json and figures")
    if len(results) < len(chosen):
        print("metagrad compare: some runs failed (see the report's header)", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from metagrad.config import load_config
    from metagrad.run import read_run_config
    from metagrad.train import train

    overrides = list(args.overrides)
    if args.compile:
        overrides.append("train.compile=true")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.resume:
        if args.out is None:
            raise _usage("--resume needs --out RUN, the run to continue")
        from metagrad.config import apply_overrides

        cfg = apply_overrides(read_run_config(args.out), overrides).validate()
    else:
        cfg = load_config(args.config, overrides)
    out = args.out or Path("runs") / cfg.algorithm.name
    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 speaks for all
    shown = ("loss", "pre_loss", "val_mse", "val_accuracy")
    last = ", ".join(f"{k} {v:.4g}" for k, v in result.last.items() if k in shown)
    print(f"trained {result.learner.name} for {result.iterations} iterations in {result.seconds:.1f} s ({last})")
    print(f"update: {result.update}")
    print(f"tasks: {result.learner.task_loop}")
    print(f"run directory: {out}   evaluate with: metagrad eval {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from metagrad.build import DTYPES, build_task, resolve_device
    from metagrad.checkpoint import write_atomic
    from metagrad.evaluate import evaluate, format_table, set_bn_statistics
    from metagrad.run import load_learner

    device = resolve_device(args.device)
    cfg, learner, meta = load_learner(args.run, args.checkpoint, device)
    if cfg.train.keep_freed_memory and device.type == "cpu":  # the run's setting (on where it predates it)
        from metagrad.allocator import keep_freed_memory

        keep_freed_memory()
    set_bn_statistics(learner, args.bn_statistics or cfg.eval.bn_statistics)
    scored = {"checkpoint": args.checkpoint, "iteration": meta.get("iteration")}  # which weights were scored
    if args.benchmark == "omniglot-runs":
        return _eval_lake(args, cfg, learner, device, scored)
    ev = cfg.eval
    shots = args.shots or ev.shots
    result = evaluate(
        learner, build_task(cfg), shots, args.steps or ev.steps, args.tasks or ev.tasks, args.scoring or ev.scoring,
        device, DTYPES[cfg.train.dtype], queries=cfg.task.queries,
    )  # fmt: skip
    print(format_table(result))
    print(f"(checkpoint at iteration {meta.get('iteration')}; mean ± 95% CI = 1.96·σ/√n over tasks)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, json.dumps({**result, **scored}, indent=1))
    target = Path(args.run) / "eval.json"  # `metagrad plot` redraws from it, with the same checkpoint
    write_atomic(target, json.dumps({**result, **scored}, indent=1))
    if args.plot:
        from metagrad.plots import plot_eval

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_eval(result, learner, build_task(cfg), args.plot)
        print(f"wrote {args.plot}")
    return 0


def _eval_lake(args: argparse.Namespace, cfg, learner, device, scored: dict) -> int:
    from metagrad.build import DTYPES
    from metagrad.checkpoint import write_atomic
    from metagrad.errors import ConfigError
    from metagrad.evaluate import evaluate_lake_runs, format_lake_table
    from metagrad.tasks.omniglot import Omniglot, load_lake_runs

    if not issubclass(cfg.task.component.target, Omniglot):  # Lake's runs are Omniglot drawings
        raise ConfigError(f"--benchmark omniglot-runs needs a run trained on omniglot, not {cfg.task.name}")
    root = args.data or Path(cfg.task.data)
    if not root.exists():
        raise ConfigError(f"--data {str(root)!r} does not exist; point it at the folder holding all_runs.zip")
    try:
        runs = load_lake_runs(root, size=cfg.task.image_size)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"could not read Lake's runs from {str(root)!r}: {e}") from None
    result = evaluate_lake_runs(learner, runs, args.steps or cfg.eval.steps, device, DTYPES[cfg.train.dtype])
    print(format_lake_table(result))
    print(f"(checkpoint at iteration {scored['iteration']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, json.dumps({**result, **scored}, indent=1))
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from metagrad.build import task_spec
    from metagrad.errors import DataError
    from metagrad.evaluate import set_bn_statistics
    from metagrad.pointfiles import read_points, write_predictions
    from metagrad.run import load_learner
    from metagrad.tasks import TaskBatch

    cfg, learner, _ = load_learner(args.run, args.checkpoint)
    set_bn_statistics(learner, cfg.eval.bn_statistics)  # queries normalised as `metagrad eval` does
    sx, sy = read_points(args.support, with_targets=True)
    qx, _ = read_points(args.query, with_targets=False)
    dtype = next(learner.parameters()).dtype
    classification = learner.loss_name == "cross_entropy"
    y = torch.as_tensor(sy, dtype=torch.int64 if classification else dtype)
    if classification:
        y = y.reshape(-1)
    shape = task_spec(cfg).input_shape
    for what, x in (("support", sx), ("query", qx)):
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise DataError(f"{what} points have {tuple(x.shape[1:])} inputs each; this run's model takes {shape}")
    x_support = torch.as_tensor(sx, dtype=dtype).reshape(len(sx), *shape)
    qx = qx.reshape(len(qx), *shape)
    if classification and not np.all(np.equal(np.mod(sy, 1), 0)):
        raise DataError("support targets of a classification run must be integer class labels")
    learner.check_batch(TaskBatch(x_support[None], y[None], x_support[None], y[None]))  # targets fit the model
    adapted = learner.adapt(x_support, y, steps=args.steps)
    steps = learner.inner_steps if args.steps is None else args.steps
    pred = learner.predict(torch.as_tensor(qx, dtype=dtype), adapted, step=steps)
    if classification:
        pred = torch.cat([pred.argmax(-1, keepdim=True).to(pred.dtype), pred.softmax(-1)], dim=-1)
    try:
        text = write_predictions(args.out, qx, pred.numpy())
    except OSError as e:
        raise DataError(f"cannot write {args.out}: {e.strerror or e}") from None
    if args.out is None:
        print(text, end="")
    else:
        print(f"adapted {learner.name} to {len(sx)} support points in {steps} steps; wrote {args.out}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from metagrad.tasks.images import describe, load_images

    data = load_images(
        args.dir, layout=args.layout, image_size=args.image_size, channels=args.channels, workers=args.workers,
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    print(describe(data, args.split))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from metagrad.build import build_task
    from metagrad.checkpoint import read_json
    from metagrad.errors import RunError
    from metagrad.plots import plot_eval
    from metagrad.run import load_learner

    if (Path(args.run) / "compare.json").is_file():
        from metagrad.compare import redraw

        for p in redraw(args.run):
            print(f"wrote {p}")
        return 0
    path = Path(args.run) / "eval.json"
    if not path.exists():
        raise RunError(f"{str(args.run)!r} has no eval.json yet; run `metagrad eval {args.run}` first")
    result = read_json(path)
    cfg, learner, _ = load_learner(args.run, result.get("checkpoint", "latest"))
    out = args.out or Path(args.run) / "eval.png"
    plot_eval(result, learner, build_task(cfg), out)
    print(f"wrote {out}")
    return 0


class _usage(Exception):  # noqa: N801 - raised like argparse's own errors
    pass


def _fail(speak: bool, message: str, code: int) -> int:
    if speak:
        print(message, file=sys.stderr)
    else:  # let rank 0 print and exit first: torchrun stops the other ranks as soon as one exits with an error
        time.sleep(1.0)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from metagrad.errors import DivergenceError, MetagradError

    commands = {"train": _cmd_train, "eval": _cmd_eval, "plot": _cmd_plot, "compare": _cmd_compare, "adapt": _cmd_adapt,
                "data": _cmd_data}  # fmt: skip
    # Under torchrun every rank meets the same error (see distributed.on_main); rank 0 alone says it.
    speak = os.environ.get("RANK", "0") == "0"
    try:
        return commands[args.command](args)
    except _usage as e:
        parser.exit(2, f"metagrad {args.command}: error: {e}\n" if speak else None)
    except DivergenceError as e:
        return _fail(speak, f"metagrad {args.command}: {e}", 1)
    except MetagradError as e:
        return _fail(speak, f"metagrad {args.command}: error: {e}", 2)
    except KeyboardInterrupt:
        print(
            f"metagrad {args.command}: interrupted (the latest checkpoint is kept; continue with --resume)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
