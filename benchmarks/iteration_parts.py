"""Where one sinusoid training iteration's time goes: each part of :meth:`metagrad.Trainer.step` timed alone.

Run from the repository root (one core)::

    taskset -c 0 python benchmarks/iteration_parts.py --steps 1

The protocol of ``benchmarks/iteration.py`` (``configs/sinusoid/maml.toml``, compiled, one thread): after a
warm-up, each part runs ``--calls`` times in a loop and its mean is printed in microseconds, then
``torch.profiler`` lists the busiest operators of the compiled meta-step (``meta_gradient``) over 100 calls.
The parts overlap a little (``backward`` includes the meta-step); the Adam step runs at learning rate 0 so that
the weights stay where training left them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metagrad import Trainer
from metagrad.distributed import average_meta_step
from metagrad.presets import preset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1, help="inner steps")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = preset("maml")
    cfg.algorithm.inner_steps = args.steps
    cfg.train.compile, cfg.train.threads, cfg.train.iterations = True, 1, 10**9
    cfg.train.val_every = cfg.train.checkpoint_every = 10**9
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d) / "run")
        learner = trainer.learner
        for _ in range(300):
            trainer.step()

        def timed(name: str, fn: Callable[[], object]) -> None:
            fn()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            print(f"  {name:<44} {(time.perf_counter() - t0) / args.calls * 1e6:8.1f} µs")

        batch = trainer.tasks.sample(cfg.train.meta_batch, cfg.task.shots, cfg.task.queries, trainer.generator)
        print(f"sinusoid MAML, {args.steps} inner step(s), one thread, mean of {args.calls} calls")
        timed("Trainer.step (the whole iteration)", trainer.step)
        timed("task sampling", lambda: trainer.tasks.sample(25, cfg.task.shots, cfg.task.queries, trainer.generator))
        timed("learner.meta_gradient (the compiled meta-step)", lambda: learner.meta_gradient(batch, 100))

        def backward() -> None:
            learner.zero_grad()
            learner.backward(batch, 100)

        timed("zero_grad + learner.backward", backward)
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
        with torch.profiler.profile() as prof:
            for _ in range(100):
                learner.meta_gradient(batch, 100)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
