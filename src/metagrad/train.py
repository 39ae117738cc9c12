"""The one training loop, shared by every algorithm.

Meta-optimizer, learning-rate schedule, progress bar, periodic validation on a fixed task set,
``metrics.jsonl``, atomic checkpoints (last N plus the best by validation), exact ``resume`` (weights,
meta-state, optimizer state, RNG state and iteration are all restored), a divergence guard and optional
gradient-norm clipping and ``torch.compile``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metagrad.algorithms import MetaLearner
from metagrad.build import DTYPES, build_learner, build_task, resolve_device
from metagrad.checkpoint import load_checkpoint, save_checkpoint, write_atomic
from metagrad.config import Config
from metagrad.distributed import all_reduce_mean, init_world, on_main, shutdown_world
from metagrad.errors import CheckpointError, ConfigError, DivergenceError
from metagrad.evaluate import VAL_SEED, fixed_tasks
from metagrad.run import checkpoints, init_run, init_run_record, latest_checkpoint, load_state, read_run_config

__all__ = ["train", "TrainResult", "meta_lr_at"]


@dataclass
class TrainResult:
    learner: MetaLearner
    run_dir: Path
    iterations: int
    seconds: float
    last: dict[str, float]


def meta_lr_at(cfg: Config, iteration: int) -> float:
    """The meta learning rate at ``iteration`` (a pure function of the iteration: nothing to checkpoint)."""
    t = cfg.train
    frac = min(iteration / t.iterations, 1.0)
    if t.lr_schedule == "linear":
        return t.meta_lr + (t.meta_lr_final - t.meta_lr) * frac
    if t.lr_schedule == "cosine":
        return t.meta_lr_final + (t.meta_lr - t.meta_lr_final) * 0.5 * (1 + math.cos(math.pi * frac))
    return t.meta_lr


def _optimizer(cfg: Config, learner: MetaLearner) -> torch.optim.Optimizer:
    t = cfg.train
    # Frozen parameters (requires_grad=False) are left out: they never get a gradient.
    groups = [{"params": [p for p in learner.model.parameters() if p.requires_grad], "lr": t.meta_lr, "name": "params"}]
    if learner.meta_state:
        lr = t.meta_state_lr if t.meta_state_lr is not None else t.meta_lr
        groups.append({"params": list(learner.rule.parameters()), "lr": lr, "name": "meta", "base_lr": lr})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.meta_lr)
    return torch.optim.Adam(groups, lr=t.meta_lr)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class _Trainer:
    def __init__(
        self, cfg: Config, run_dir: Path, progress: bool, callback: Callable[[int, dict[str, float]], None] | None
    ) -> None:
        self.cfg, self.run_dir, self.progress, self.callback = cfg, run_dir, progress, callback
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.world, self.device = init_world(resolve_device(t.device))
        if t.meta_batch % self.world.size:
            raise ConfigError(f"train.meta_batch={t.meta_batch} must be divisible by the {self.world.size} ranks")
        self.progress = progress and self.world.is_main
        self.dtype = DTYPES[t.dtype]
        self.dist = build_task(cfg, "train")
        self.learner = build_learner(cfg).to(self.device, self.dtype)
        if cfg.eval.bn_statistics == "running" and not self.learner.tracks_statistics:
            raise ConfigError(
                "eval.bn_statistics = 'running' needs a model with batch-norm running statistics (model.bn = "
                "'per_step', or a BatchNorm with track_running_stats=True)"
            )
        if t.compile:
            self.learner.compile()
        self.opt = _optimizer(cfg, self.learner)
        self.generator = torch.Generator().manual_seed(t.seed)
        val_family = build_task(cfg, "val")
        self.val = fixed_tasks(val_family, t.val_tasks, cfg.task.shots, "dense", VAL_SEED, cfg.task.queries)
        self.val = self.val.to(self.device, self.dtype)
        self.iteration = 0
        self.seconds = 0.0
        self.best = math.inf

    def _inner_lr(self) -> Any:
        return getattr(self.cfg.algorithm, "inner_lr", None)

    # ----- checkpoints --------------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        return {f"{g}.{k}": v for g, tree in self.learner.state_tensors().items() for k, v in tree.items()}

    def save(self, name: str | None = None) -> Path | None:
        weights = self._weights()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        # Checked on every rank (their weights are identical), so all stop together.
        if bad:  # never write a checkpoint that a later "last good checkpoint" message would point to
            last = latest_checkpoint(self.run_dir)
            raise DivergenceError(
                f"training diverged by iteration {self.iteration}: {bad[0]} holds NaN/inf; the learning rates are "
                f"probably too high (train.meta_lr={self.cfg.train.meta_lr}, algorithm.inner_lr={self._inner_lr()}); "
                f"last good checkpoint: {last if last else 'none yet'}"
            )
        if not self.world.is_main:
            return None
        tensors, opt_meta = _optimizer_tensors(self.opt)
        tensors["rng.tasks"] = self.generator.get_state()
        meta = {
            "iteration": self.iteration,
            "seconds": self.seconds,
            "best_val": self.best if math.isfinite(self.best) else None,
            "algorithm": self.learner.name,
            "optimizer": opt_meta,
            "config": self.cfg.to_dict(),
        }
        root = self.run_dir / "checkpoints"
        path = save_checkpoint(root / (name or f"iter-{self.iteration:08d}"), weights, tensors, meta)
        if name is None:
            for _, old in checkpoints(self.run_dir)[: -self.cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def restore(self, path: Path) -> None:
        weights, tensors, meta = load_checkpoint(path)
        load_state(self.learner, weights, path)
        try:
            _restore_optimizer(self.opt, tensors, meta["optimizer"])
            self.generator.set_state(tensors["rng.tasks"])
            self.iteration = int(meta["iteration"])
            self.seconds = float(meta["seconds"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path} does not hold this run's trainer state ({type(e).__name__}: {e})") from None
        self.best = meta["best_val"] if meta.get("best_val") is not None else math.inf
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        # Lines written after the checkpoint we resume from would otherwise appear twice.
        path = self.run_dir / "metrics.jsonl"
        if not path.exists() or not self.world.is_main:
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= self.iteration:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line torn by a kill: drop it and everything after
        write_atomic(path, "".join(x + "\n" for x in keep))

    # ----- the loop ------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def validate(self) -> dict[str, float]:
        steps = self.learner.inner_steps
        curve = self.learner.adaptation_curve(self.val, max(steps, self.cfg.eval.steps))
        name = f"val_{self.learner.metric_name}"
        return {name: curve[:, steps].mean().item(), f"{name}_eval_steps": curve[:, -1].mean().item()}

    def _check_and_clip(self, grads: list[torch.Tensor], loss: torch.Tensor) -> float:
        """Stop on a non-finite meta-loss or meta-gradient; clip the global norm if asked. Returns the norm."""
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        n, value = norm.item(), loss.item()
        if not (math.isfinite(n) and math.isfinite(value)):
            last = latest_checkpoint(self.run_dir)
            raise DivergenceError(
                f"training diverged at iteration {self.iteration + 1}: meta-loss {value:.4g}, "
                f"meta-gradient norm {n:.4g}; the learning rates are probably too high "
                f"(train.meta_lr={self.cfg.train.meta_lr}, algorithm.inner_lr={self._inner_lr()}) "
                f"or set train.grad_clip; last good checkpoint: {last if last else 'none yet'}"
            )
        clip = self.cfg.train.grad_clip
        if clip and n > clip:
            for g in grads:
                g.mul_(clip / (n + 1e-6))
        return n

    def step(self) -> dict[str, float]:
        batch = self.dist.sample(self.cfg.train.meta_batch, self.cfg.task.shots, self.cfg.task.queries, self.generator)
        batch = batch.to(self.device, self.dtype)
        shard = (self.world.rank, self.world.size)
        self.opt.zero_grad(set_to_none=True)
        # Also folds the batch into batch-norm running statistics (identical on every rank).
        metrics = self.learner.backward(batch, self.iteration, self.generator, shard)
        grads = [p.grad for p in self.learner.parameters() if p.grad is not None]
        if self.world.enabled:
            names = list(metrics)
            extra = self.learner.extra_state
            reduced = all_reduce_mean(grads + [metrics[k] for k in names] + list(extra.values()), self.world)
            for g, r in zip(grads, reduced, strict=False):
                g.copy_(r)
            metrics = dict(zip(names, reduced[len(grads) : len(grads) + len(names)], strict=True))
            for k, v in zip(list(extra), reduced[len(grads) + len(names) :], strict=True):
                extra[k] = v
        norm = self._check_and_clip(grads, metrics["loss"])
        lr = meta_lr_at(self.cfg, self.iteration)
        scale = lr / self.cfg.train.meta_lr if self.cfg.train.meta_lr > 0 else 1.0
        for group in self.opt.param_groups:
            group["lr"] = lr if group.get("name") == "params" else group["base_lr"] * scale
        try:
            self.opt.step()
        except RuntimeError as e:  # e.g. a learning rate too large to represent in the weights' dtype
            raise DivergenceError(
                f"the optimizer step failed at iteration {self.iteration + 1} ({e}); the learning rate "
                f"train.meta_lr={self.cfg.train.meta_lr} is probably far too high"
            ) from None
        self.opt.zero_grad(set_to_none=True)
        self.iteration += 1
        return {**{k: v.item() for k, v in metrics.items()}, "grad_norm": norm, "lr": lr}

    def run(self) -> dict[str, float]:
        t = self.cfg.train
        last: dict[str, float] = {}
        window: list[dict[str, float]] = []
        bar = tqdm(
            total=t.iterations, initial=self.iteration, disable=not self.progress, desc=self.learner.name,
            unit="it", dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip
        try:
            while self.iteration < t.iterations:
                start = time.perf_counter()
                window.append(self.step())
                self.seconds += time.perf_counter() - start
                bar.update(1)
                it = self.iteration
                # Also at checkpoints, so that a resumed run's log windows match an uninterrupted run's.
                if it % t.log_every == 0 or it % t.checkpoint_every == 0 or it == t.iterations:
                    last = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    window = []
                    self.log({"iteration": it, **last, "seconds": round(self.seconds, 3)})
                    bar.set_postfix(loss=f"{last['loss']:.4f}", pre=f"{last['pre_loss']:.3f}", refresh=False)
                    if self.callback is not None:
                        self.callback(it, last)
                if self.world.is_main and (it % t.val_every == 0 or it == t.iterations):
                    val = self.validate()
                    last.update(val)
                    self.log({"iteration": it, **val})
                    # Lower is better: validation MSE, or minus the validation accuracy.
                    value = val[f"val_{self.learner.metric_name}"]
                    score = -value if self.learner.metric_higher_is_better else value
                    if score < self.best:
                        self.best = score
                        self.save("best")
                if it % t.checkpoint_every == 0 or it == t.iterations:
                    self.save()
        finally:
            bar.close()
        return last


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the learner ``cfg`` describes into ``run_dir`` (or continue it with ``resume=True``).

    ``callback(iteration, metrics)`` is called at every log interval (e.g. to report progress elsewhere)."""
    run_dir = Path(run_dir)
    cfg.validate()
    if resume:
        stored = read_run_config(run_dir)
        for key in ("optimizer", "dtype"):
            if getattr(stored.train, key) != getattr(cfg.train, key):
                raise ConfigError(f"train.{key} cannot change on resume (the checkpoint holds {key} state)")
        if stored.to_dict() | {"train": None} != cfg.to_dict() | {"train": None}:
            raise CheckpointError(
                f"resume of {str(run_dir)!r} must use the run's own config (only [train] keys may change)"
            )
    trainer = _Trainer(cfg, run_dir, progress, callback)
    try:
        if not resume:
            on_main(trainer.world, lambda: init_run(run_dir, cfg, overwrite=overwrite))
        else:  # the run's record follows the config it now runs with
            on_main(trainer.world, lambda: init_run_record(run_dir, cfg))
            path = latest_checkpoint(run_dir)
            if path is not None:
                trainer.restore(path)
            else:
                trainer._truncate_metrics()  # killed before its first checkpoint: start over cleanly
        last = trainer.run()
    finally:
        shutdown_world(trainer.world)
    return TrainResult(trainer.learner, run_dir, trainer.iteration, trainer.seconds, last)
