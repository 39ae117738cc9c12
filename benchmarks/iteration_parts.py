"""Where one sinusoid training iteration's time goes: each part of :meth:`metagrad.Trainer.step` timed alone, then
in sequence.

Run from the repository root (one core)::

    taskset -c 0 python benchmarks/iteration_parts.py --steps 1                     # the update fused (default)
    taskset -c 0 python benchmarks/iteration_parts.py --steps 1 --update separate   # train.fused_update = false

The protocol of ``benchmarks/iteration.py`` (``configs/sinusoid/maml.toml``, compiled, one thread): after a
warm-up, each part runs ``--calls`` times in a loop and its mean is printed in microseconds. Then the same parts
are timed where they run, inside ``--calls`` real ``Trainer.step`` calls (the trainer's collaborators wrapped in
timers): there each part also pays for the caches that the others evicted. Last, ``torch.profiler`` lists the
busiest operators of the compiled meta-step (``meta_gradient``) over 100 calls.
The parts overlap a little (``backward`` includes the meta-step); the Adam step runs at learning rate 0 so that
the weights stay where training left them. With the fused update (:mod:`metagrad.fused_update`, the default) the
tasks' arithmetic (the sinusoid family's ``assemble``), meta-step, guard and Adam step are one compiled call,
timed as one part; sampling in sequence is then the family's ``draw`` (its generator calls) only. Then also
timed: whole ``Trainer.step`` calls whose compiled call is replaced by one returning its last outputs, which is
the Python the trainer runs around that call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metagrad import Trainer
from metagrad.distributed import average_meta_step
from metagrad.presets import preset


def in_sequence(trainer: Trainer, calls: int) -> dict[str, float]:
    """Time the parts where they run: the trainer's own collaborators wrapped in timers for ``calls`` steps. Alone
    in a loop a part keeps its code and data in cache; in sequence the other parts have evicted them."""
    spent: dict[str, float] = {}

    def timer(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return timed

    parts = {
        "task sampling": (trainer.tasks, "sample"),
        "learner.backward (the meta-step, writing .grad)": (trainer.learner, "backward"),
        "guard and norm, one host copy of the metrics": (trainer, "_check_and_clip"),
        "optimizer.step (fused Adam)": (trainer.optimizer, "step"),
        "scheduler.step": (trainer.scheduler, "step"),
    }
    if trainer._fused is not None:
        drawn = trainer._assembled_in_graph()
        parts = {
            # With a family that splits its sampling, only its generator calls run here (the rest is compiled).
            # Its draw is timed on the class: a method set on the instance makes the trainer sample eagerly.
            "task sampling": (type(trainer.tasks), "draw") if drawn else (trainer.tasks, "sample"),
            "choosing the fused update (its checks)": (trainer, "_fused_update"),
            "the compiled update: tasks, meta-step, norm, guard, Adam": (trainer._fused, "_compiled"),
            "scheduler.step": (trainer.scheduler, "step"),
        }
    saved = {name: owner.__dict__.get(attr) for name, (owner, attr) in parts.items()}
    for name, (owner, attr) in parts.items():
        setattr(owner, attr, timer(name, getattr(owner, attr)))
    t0 = time.perf_counter()
    for _ in range(calls):
        trainer.step()
    total = time.perf_counter() - t0
    for name, (owner, attr) in parts.items():  # as they were (the scheduler wraps optimizer.step itself)
        if saved[name] is None:
            delattr(owner, attr)
        else:
            setattr(owner, attr, saved[name])
    out = {"Trainer.step (the whole iteration)": total / calls * 1e6}
    out |= {name: t / calls * 1e6 for name, t in spent.items()}
    out["the rest (Python around the parts, logging)"] = (total - sum(spent.values())) / calls * 1e6
    for name, us in out.items():
        print(f"  {name:<48} {us:8.1f} µs")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1, help="inner steps")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--update", choices=("fused", "separate"), default="fused", help="train.fused_update")
    ap.add_argument("--json", help="write both tables and the profiler's top rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = preset("maml")
    cfg.algorithm.inner_steps = args.steps
    cfg.train.compile, cfg.train.threads, cfg.train.iterations = True, 1, 10**9
    cfg.train.val_every = cfg.train.checkpoint_every = 10**9
    cfg.train.fused_update = args.update == "fused"
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d) / "run")
        learner = trainer.learner
        for _ in range(300):
            trainer.step()

        alone: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], object]) -> None:
            fn()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            alone[name] = (time.perf_counter() - t0) / args.calls * 1e6
            print(f"  {name:<44} {alone[name]:8.1f} µs")

        batch = trainer.tasks.sample(cfg.train.meta_batch, cfg.task.shots, cfg.task.queries, trainer.generator)
        print(f"sinusoid MAML, {args.steps} inner step(s), one thread, mean of {args.calls} calls")
        timed("Trainer.step (the whole iteration)", trainer.step)
        timed("task sampling", lambda: trainer.tasks.sample(25, cfg.task.shots, cfg.task.queries, trainer.generator))
        timed("learner.meta_gradient (the compiled meta-step)", lambda: learner.meta_gradient(batch, 100))

        def backward() -> None:
            learner.zero_grad()
            learner.backward(batch, 100)

        timed("zero_grad + learner.backward", backward)
        if trainer._fused is not None:
            # What the trainer spends around the compiled call: whole steps with the call replaced by one that
            # returns its last outputs (the weights stay where they are).
            fused, compiled = trainer._fused, trainer._fused._compiled
            outputs: list[object] = []
            fused._compiled = lambda *a: outputs.append(compiled(*a)) or outputs[-1]
            trainer.step()
            fused._compiled = lambda *a: outputs[-1]
            timed("Trainer.step without the compiled call (its Python)", trainer.step)
            fused._compiled = compiled
            lrs = [g["lr"] for g in trainer.optimizer.param_groups]
            for g in trainer.optimizer.param_groups:
                g["lr"] = 0.0
            timed("the fused update (one compiled call and its inputs)", lambda: trainer._fused(batch, 100, None))
            for g, lr in zip(trainer.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
        metrics = learner.backward(batch, 100)
        grads = [p.grad for p in learner._named_parameters(learner).values() if p.grad is not None]
        timed("guard and norm, one host copy of the metrics", lambda: trainer._check_and_clip(grads, metrics))
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]
        for g in trainer.optimizer.param_groups:
            g["lr"] = 0.0
        timed("optimizer.step (fused Adam)", trainer.optimizer.step)
        for g, lr in zip(trainer.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        timed("learner.zero_grad", learner.zero_grad)
        timed("scheduler.step", trainer.scheduler.step)
        timed("distributed average (one process)", lambda: average_meta_step(learner, metrics, trainer.world))
        print(f"the same parts in sequence, inside {args.calls} real Trainer.step calls (each wrapped in a timer)")
        sequence = in_sequence(trainer, args.calls)
        with torch.profiler.profile() as prof:
            for _ in range(100):
                learner.meta_gradient(batch, 100)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        if args.json:
            total = sum(e.self_cpu_time_total for e in events)
            top = [{"name": e.key, "self_percent": 100 * e.self_cpu_time_total / total, "calls": e.count}
                   for e in events[:12]]  # fmt: skip
            info = {"torch": torch.__version__, "steps": args.steps, "calls": args.calls, "threads": 1,
                    "update": args.update}  # fmt: skip
            with open(args.json, "w") as f:
                json.dump({"info": info, "alone_us": alone, "in_sequence_us": sequence, "profile_top": top}, f,
                          indent=1)  # fmt: skip
        trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
