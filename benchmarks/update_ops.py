"""The ATen operations one training update runs beneath ``torch.func``: what a CUDA graph of the eager update
(``train.cuda_graphs``) replays, one kernel each on a GPU, split into the meta-step and the rest (the sinusoid
tasks' assembly, the norm, the guard, clipping and the optimizer's step). Counted on any device, the CPU included
(views and allocations left out: they launch nothing).

Run from the repository root::

    python benchmarks/update_ops.py                        # sinusoid MAML, 1 and 5 inner steps
    python benchmarks/update_ops.py --algorithm maml_enhanced --steps 5
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that move no data (views, metadata, allocations): no kernel on a GPU.
_FREE = {"view", "t", "transpose", "expand", "_unsafe_view", "detach", "alias", "select", "slice", "unsqueeze",
         "squeeze", "permute", "as_strided", "empty", "empty_strided", "_reshape_alias", "split", "unbind",
         "lift_fresh", "view_as", "new_empty", "new_empty_strided", "_to_copy"}  # fmt: skip


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in _FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountingGraph:
    """A stand-in for a CUDA graph whose replay counts what the captured update runs (and what of it is the
    meta-step)."""

    last: tuple[collections.Counter[str], collections.Counter[str]]

    def capture(self, body: Any, static: list[torch.Tensor]) -> None:
        self.body, self.static = body, static

    def replay(self) -> None:
        from metagrad.algorithms.base import MetaLearner

        meta = collections.Counter()
        inner = MetaLearner._fused_gradient

        def counted(learner: Any, *args: Any) -> Any:  # the meta-step's share, counted apart
            with _Count() as c:
                out = inner(learner, *args)
            meta.update(c.ops)
            return out

        MetaLearner._fused_gradient = counted
        try:
            with _Count() as whole:
                self.output = self.body(self.static)
        finally:
            MetaLearner._fused_gradient = inner
        _CountingGraph.last = (whole.ops, meta)


def count(algorithm: str, steps: int) -> dict[str, Any]:
    from metagrad import Trainer
    from metagrad.presets import preset

    cfg = preset(algorithm)
    cfg.algorithm.inner_steps = steps
    cfg.train.iterations, cfg.train.threads, cfg.train.device = 10**9, 1, "cpu"
    cfg.train.val_every = cfg.train.checkpoint_every = 10**9
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d) / "run")
        trainer._capture = _CountingGraph
        for _ in range(3):  # eager, capture and replay, replay
            trainer.step()
        trainer.close()
    whole, meta = _CountingGraph.last
    total, meta_total = sum(whole.values()), sum(meta.values())
    return {"algorithm": algorithm, "steps": steps, "ops": total, "meta_step_ops": meta_total,
            "update_ops": total - meta_total, "by_name": dict(whole.most_common())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", default="maml", help="a sinusoid preset")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'algorithm':<14} {'steps':>5} {'operations':>10} {'meta-step':>9} {'the rest':>8}  busiest")
    for steps in args.steps:
        row = count(args.algorithm, steps)
        busiest = ", ".join(f"{k} {v}" for k, v in list(row["by_name"].items())[:6])
        print(f"{row['algorithm']:<14} {steps:>5} {row['ops']:>10} {row['meta_step_ops']:>9} {row['update_ops']:>8}"
              f"  {busiest}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
