"""The public :class:`Trainer`: one training loop for every task, model and algorithm.

It owns the meta-optimizer, the meta learning-rate schedule (an ordinary ``torch.optim.lr_scheduler``), the task
stream's generator, validation on a fixed task set, ``metrics.jsonl`` (and optionally TensorBoard), callbacks,
atomic checkpoints (last N plus the best by validation), exact resume (weights, learned rule tensors, optimizer
and scheduler state, RNG state and iteration), a divergence guard, gradient-norm clipping, ``torch.compile`` and
the torchrun all-reduce. Drive it yourself::

    trainer = Trainer(cfg, "runs/mine", callbacks=[MyLogger()])
    trainer.resume()                      # optional: continue the run in runs/mine from its latest checkpoint
    while trainer.iteration < 500:
        metrics = trainer.step()          # one meta-iteration
        if trainer.iteration % 100 == 0:
            print(trainer.evaluate())     # validation (also keeps checkpoints/best)
            trainer.save()                # checkpoints/iter-00000100, ...
    trainer.close()

or let :meth:`Trainer.fit` (what :func:`train` and ``metagrad train`` do) run the schedule of ``cfg.train``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metagrad.algorithms import MetaLearner
from metagrad.allocator import keep_freed_memory
from metagrad.build import DTYPES, build_learner, build_task, resolve_device
from metagrad.callbacks import TensorBoardLogger
from metagrad.checkpoint import (
    BEST,
    CHECKPOINTS,
    checkpoint_name,
    latest_checkpoint,
    learner_tensors,
    prune_checkpoints,
    restore_training_state,
    save_training_state,
    write_atomic,
)
from metagrad.config import Config
from metagrad.cuda_graph import Graph
from metagrad.distributed import average_meta_step, init_world, on_main, shutdown_world
from metagrad.errors import CheckpointError, ConfigError, DivergenceError, RunError
from metagrad.evaluate import VAL_SEED, fixed_tasks
from metagrad.fused_update import Draws, FusedUpdate, assembles, unfused_reason
from metagrad.run import init_run, init_run_record, read_run_config

__all__ = ["Trainer", "train", "TrainResult", "meta_lr_at", "lr_scheduler"]


@dataclass
class TrainResult:
    learner: MetaLearner
    run_dir: Path
    iterations: int
    seconds: float
    last: dict[str, float]
    update: str = ""  # how the last iteration's update ran (Trainer.update)


def meta_lr_at(cfg: Config, iteration: int) -> float:
    """The meta learning rate ``train.lr_schedule`` gives at ``iteration`` (constant, linear or cosine from
    ``train.meta_lr`` to ``train.meta_lr_final`` over ``train.iterations``, then held)."""
    t = cfg.train
    frac = min(iteration / t.iterations, 1.0)
    if t.lr_schedule == "linear":
        return t.meta_lr + (t.meta_lr_final - t.meta_lr) * frac
    if t.lr_schedule == "cosine":
        return t.meta_lr_final + (t.meta_lr - t.meta_lr_final) * 0.5 * (1 + math.cos(math.pi * frac))
    return t.meta_lr


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_schedule`` as a ``LambdaLR``: every parameter group's learning rate is scaled by
    ``meta_lr_at(cfg, i) / train.meta_lr`` (so a separate ``train.meta_state_lr`` follows the same shape)."""
    meta_lr = cfg.train.meta_lr

    def factor(iteration: int) -> float:
        return meta_lr_at(cfg, iteration) / meta_lr if meta_lr > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimizer(cfg: Config, learner: MetaLearner) -> torch.optim.Optimizer:
    t = cfg.train
    # Frozen parameters (requires_grad=False) are left out: they never get a gradient.
    groups = [{"params": [p for p in learner.model.parameters() if p.requires_grad], "lr": t.meta_lr, "name": "params"}]
    if learner.meta_state:
        lr = t.meta_state_lr if t.meta_state_lr is not None else t.meta_lr
        groups.append({"params": list(learner.rule.parameters()), "lr": lr, "name": "meta"})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.meta_lr)
    # The fused kernel: one pass over every tensor instead of a dozen small ops per tensor (a third of the time of
    # a sinusoid meta-step's Adam update); a checkpoint's own setting wins when it is loaded.
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(groups, lr=t.meta_lr, fused=fused or None)


def _results_config(cfg: Config) -> dict[str, Any]:
    """What resume compares: the config less [train] (its optimizer and dtype are checked apart) and task.workers
    (decoding processes only; they change no image, see metagrad.tasks.images)."""
    config = cfg.to_dict() | {"train": None}
    config["task"] = {k: v for k, v in config["task"].items() if k != "workers"}
    return config


class _IterationCallback:
    """``train(callback=f)``: ``f(iteration, metrics)`` at every training line of metrics.jsonl."""

    def __init__(self, fn: Callable[[int, dict[str, float]], None]) -> None:
        self.fn = fn

    def on_train_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.fn(record["iteration"], {k: v for k, v in record.items() if k not in ("iteration", "seconds")})


class Trainer:
    """Meta-trains the learner ``cfg`` describes into the run directory ``run_dir``.

    Construction builds the task stream, the learner (on ``train.device`` in ``train.dtype``), the optimizer, the
    scheduler and the validation tasks, and writes nothing. The first :meth:`step` or :meth:`save` creates the
    run directory (refusing to replace another run unless ``overwrite``); :meth:`resume`, called first instead,
    continues the run already there. ``callbacks`` receive the hooks of :mod:`metagrad.callbacks`.

    Attributes: ``learner``, ``optimizer``, ``scheduler``, ``generator`` (the task stream), ``iteration``,
    ``seconds`` (time spent in :meth:`step`), ``best`` (the best validation score, lower is better), ``last``
    (the latest logged means), ``world`` (the torchrun rank and size).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        overwrite: bool = False,
        callbacks: Sequence[Any] = (),
        progress: bool = False,
    ) -> None:
        cfg.validate()
        self.cfg, self.run_dir, self.overwrite = cfg, Path(run_dir), overwrite
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.world, self.device = init_world(resolve_device(t.device))
        try:
            self._build(progress)
            self.callbacks = list(callbacks)
            if t.tensorboard and self.world.is_main:
                self.callbacks.append(TensorBoardLogger(self.run_dir / "tensorboard"))
        except BaseException:
            shutdown_world(self.world)
            raise
        if t.keep_freed_memory and self.device.type == "cpu":  # (after the build: its temporaries go back)
            keep_freed_memory()
        self.iteration = self.start_iteration = 0
        self.seconds = 0.0
        self.best = math.inf
        self.last: dict[str, float] = {}
        self._window: list[dict[str, float]] = []
        self._opened = False
        self._fused: FusedUpdate | None = None  # built at the first step it applies to
        self._capture: Callable[[], Graph] | None = None  # (tests: a stand-in for CUDA graphs on the CPU)
        self._unfused: str | None = None  # why the last step took the separate parts

    def _build(self, progress: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        if t.meta_batch < self.world.size:
            raise ConfigError(f"train.meta_batch={t.meta_batch} is below the {self.world.size} ranks' one task each")
        self.progress = progress and self.world.is_main
        self.dtype = DTYPES[t.dtype]
        self.tasks = build_task(cfg, "train")
        self.learner = build_learner(cfg).to(self.device, self.dtype)
        if cfg.eval.bn_statistics == "running" and not self.learner.tracks_statistics:
            raise ConfigError(
                "eval.bn_statistics = 'running' needs a model with batch-norm running statistics (model.bn = "
                "'per_step', or a BatchNorm with track_running_stats=True)"
            )
        if t.compile:
            self.learner.compile(**({} if t.compile_mode == "default" else {"mode": t.compile_mode}))
        self.optimizer = _optimizer(cfg, self.learner)
        self.scheduler = lr_scheduler(cfg, self.optimizer)
        self.generator = torch.Generator().manual_seed(t.seed)
        val_family = build_task(cfg, "val")
        self.val_tasks = fixed_tasks(val_family, t.val_tasks, cfg.task.shots, "dense", VAL_SEED, cfg.task.queries)
        self.val_tasks = self.val_tasks.to(self.device, self.dtype)

    # ----- the run directory ----------------------------------------------------------------------------
    def _open(self) -> None:
        if not self._opened:
            on_main(self.world, lambda: init_run(self.run_dir, self.cfg, overwrite=self.overwrite))
            self._opened = True

    def resume(self, checkpoint: str | Path | None = None) -> Path | None:
        """Continue the run in ``run_dir``: restore the trainer from its latest checkpoint (or ``checkpoint``) and
        go on from there, bit for bit as if never interrupted. The config must be the run's own (only ``[train]``
        keys other than ``optimizer`` and ``dtype``, and ``task.workers``, may change). Returns the checkpoint
        restored, or None when the run had none yet (it then starts over). Call it before the first :meth:`step`."""
        if self._opened:
            raise RunError("Trainer.resume() must come before the first step() or save()")
        stored = read_run_config(self.run_dir)
        for key in ("optimizer", "dtype"):
            if getattr(stored.train, key) != getattr(self.cfg.train, key):
                raise ConfigError(f"train.{key} cannot change on resume (the checkpoint holds {key} state)")
        if _results_config(stored) != _results_config(self.cfg):
            raise CheckpointError(
                f"resume of {str(self.run_dir)!r} must use the run's own config (only [train] keys and "
                "task.workers may change)"
            )
        # The run's record follows the config it now runs with.
        on_main(self.world, lambda: init_run_record(self.run_dir, self.cfg))
        self._opened = True
        path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(self.run_dir)
        if path is not None:
            base_lrs = list(self.scheduler.base_lrs)
            meta = restore_training_state(path, self.learner, self.optimizer, self.scheduler, self.generator)
            # [train] keys may change on resume (e.g. train.meta_lr): the schedule follows the config it now runs
            # with, at the restored iteration; with the run's own config this is exactly the restored state.
            self.scheduler.base_lrs = base_lrs
            for group, base, fn in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas, strict=True):
                group["initial_lr"], group["lr"] = base, base * fn(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            self.iteration = self.start_iteration = int(meta["iteration"])
            self.seconds = float(meta["seconds"])
            self.best = meta["best_val"] if meta.get("best_val") is not None else math.inf
        self._truncate_metrics()  # killed before its first checkpoint: start over cleanly
        return path

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

    # ----- hooks and logs -------------------------------------------------------------------------------
    def _call(self, hook: str, *args: Any) -> None:
        if self.world.is_main:
            for cb in self.callbacks:
                fn = getattr(cb, hook, None)
                if fn is not None:
                    fn(self, *args)

    def _log(self, record: dict[str, Any], training: bool) -> None:
        if not self.world.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._call("on_log", record)
        if training:
            self._call("on_train_log", record)

    def _flush(self) -> None:
        """Log the means over the iterations since the last training line (none if there were none)."""
        if not self._window:
            return
        # Each metric over the iterations that have it: one turned on or off mid-window (learner.diagnostics) is
        # the mean of its own iterations.
        names = dict.fromkeys(k for w in self._window for k in w)
        self.last = {k: _mean([w[k] for w in self._window if k in w]) for k in names}
        self._window = []
        self._log({"iteration": self.iteration, **self.last, "seconds": round(self.seconds, 3)}, training=True)

    # ----- training -------------------------------------------------------------------------------------
    def _inner_lr(self) -> Any:
        return getattr(self.cfg.algorithm, "inner_lr", None)

    def _diverged(self, what: str) -> DivergenceError:
        last = latest_checkpoint(self.run_dir)
        return DivergenceError(
            f"training diverged {what}; the learning rates are probably too high (train.meta_lr="
            f"{self.cfg.train.meta_lr}, algorithm.inner_lr={self._inner_lr()}) or set train.grad_clip; last good "
            f"checkpoint: {last if last else 'none yet'}"
        )

    def _check_and_clip(self, grads: list[torch.Tensor], metrics: dict[str, torch.Tensor]) -> tuple[float, dict]:
        """Stop on a non-finite meta-loss or meta-gradient; clip the global norm if asked. Returns the norm and
        the metrics as floats (one device-to-host copy for all of them)."""
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        names = list(metrics)
        n, *rest = torch.stack([norm, *(metrics[k].to(norm.dtype).reshape(()) for k in names)]).tolist()
        values = dict(zip(names, rest, strict=True))
        value = values["loss"]
        if not (math.isfinite(n) and math.isfinite(value)):
            raise self._diverged(
                f"at iteration {self.iteration + 1}: meta-loss {value:.4g}, meta-gradient norm {n:.4g}"
            )
        clip = self.cfg.train.grad_clip
        if clip and n > clip:
            for g in grads:
                g.mul_(clip / (n + 1e-6))
        return n, values

    def step(self) -> dict[str, float]:
        """One meta-iteration: sample a meta-batch, meta-gradient, (all-reduce), guard and clip, optimizer and
        scheduler step. With a compiled learner on the CPU all but the scheduler's step run as one compiled call
        (:mod:`metagrad.fused_update`; ``train.fused_update = false`` keeps them apart). Returns its metrics
        (``loss``, ``pre_loss``, ... , ``grad_norm``, ``lr``). A training line goes to metrics.jsonl every
        ``train.log_every`` iterations, at each ``train.checkpoint_every`` and at ``train.iterations``."""
        self._open()
        start = time.perf_counter()
        t = self.cfg.train
        shots, queries = self.cfg.task.shots, self.cfg.task.queries
        fused = self._fused_update(t.meta_batch)
        if fused is not None and self._assembled_in_graph():
            # Only the generator's calls here; the task family's arithmetic runs in the compiled update.
            batch = Draws(self.tasks, self.tasks.draw(t.meta_batch, shots, queries, self.generator), t.meta_batch,
                          shots, queries)  # fmt: skip
        else:
            batch = self.tasks.sample(t.meta_batch, shots, queries, self.generator).to(self.device, self.dtype)
            if len(batch) != t.meta_batch:
                fused = self._fused_update(len(batch))
        if fused is not None:
            lr = self.optimizer.param_groups[0]["lr"]
            norm, finite, values = fused(batch, self.iteration, self.generator)
            if not finite:  # nothing was updated
                raise self._diverged(
                    f"at iteration {self.iteration + 1}: meta-loss {values['loss']:.4g}, meta-gradient norm {norm:.4g}"
                )
            self.scheduler.step()
            return self._stepped({**values, "grad_norm": norm, "lr": lr}, start)
        # The learner's own zero_grad: the same as the optimizer's here (it holds every parameter), without the
        # optimizer's per-call profiling scope.
        self.learner.zero_grad(set_to_none=True)
        # Also folds the batch into batch-norm running statistics (identical on every rank).
        shard = (self.world.rank, self.world.size)
        metrics = self.learner.backward(batch, self.iteration, self.generator, shard)
        metrics = average_meta_step(self.learner, metrics, self.world)
        grads = [p.grad for p in self.learner._named_parameters(self.learner).values() if p.grad is not None]
        norm, values = self._check_and_clip(grads, metrics)
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            self.optimizer.step()
        except RuntimeError as e:  # e.g. a learning rate too large to represent in the weights' dtype
            raise DivergenceError(
                f"the optimizer step failed at iteration {self.iteration + 1} ({e}); the learning rate "
                f"train.meta_lr={t.meta_lr} is probably far too high"
            ) from None
        self.scheduler.step()
        self.learner.zero_grad(set_to_none=True)
        return self._stepped({**values, "grad_norm": norm, "lr": lr}, start)

    def _fused_update(self, tasks: int) -> FusedUpdate | None:
        """The one-call update (metagrad.fused_update) where it applies, else None (the separate parts)."""
        t, size = self.cfg.train, self.world.size
        if not t.fused_update:
            self._unfused = "train.fused_update = false"
            return None
        fused = self._fused
        if fused is not None and fused.applies(self.learner, self.optimizer, t.grad_clip, tasks, size):
            self._unfused = None
            return fused
        graphed = (t.cuda_graphs and self.device.type == "cuda") or self._capture is not None
        self._unfused = unfused_reason(self.learner, self.optimizer, tasks, size, graphed)
        if self._unfused is not None:
            return None
        fused = self._fused = FusedUpdate(self.learner, self.optimizer, t.grad_clip, graphed, self._capture)
        return fused

    @property
    def update(self) -> str:
        """How the last step's update ran, in words: replayed from a CUDA graph, one compiled call
        (:mod:`metagrad.fused_update`), or the separate parts and why (``metagrad train`` prints it)."""
        if self.iteration == self.start_iteration:
            return "no step yet"
        fused = self._fused
        if fused is None or self._unfused is not None:
            return f"separate parts ({self._unfused})" if self._unfused else "separate parts"
        graphs = fused.graphs
        if graphs is None:
            return "one compiled call (meta-gradient, guard, clipping and optimizer step)"
        if graphs.failed is not None:
            return f"eagerly in one call: the CUDA graph capture failed ({graphs.failed})"
        if not graphs.captures:
            return "eagerly in one call (a CUDA graph captures it at the next step)"
        how = "compiled, " if self.learner._compiled is not None else ""
        return f"replayed from a CUDA graph ({how}captured {graphs.captures} time{'s' * (graphs.captures != 1)})"

    def _assembled_in_graph(self) -> bool:
        """Whether the fused update also assembles the tasks (a family with ``draw`` and ``assemble``): not for
        labels, whose range is checked on every batch."""
        return self.learner.loss_name != "cross_entropy" and assembles(self.tasks)

    def _stepped(self, out: dict[str, float], start: float) -> dict[str, float]:
        t = self.cfg.train
        self.iteration += 1
        self.seconds += time.perf_counter() - start
        self._window.append(out)
        it = self.iteration
        # Also at checkpoints, so that a resumed run's log windows match an uninterrupted run's.
        if it % t.log_every == 0 or it % t.checkpoint_every == 0 or it == t.iterations:
            self._flush()
        self._call("on_step", out)
        return out

    def evaluate(self, save_best: bool = True) -> dict[str, float]:
        """Validate on the fixed validation tasks (``train.val_tasks``, seeded apart from training): the metric
        after the trained inner steps (``val_mse`` or ``val_accuracy``) and after ``eval.steps``. Logged to
        metrics.jsonl; a new best is saved as ``checkpoints/best`` unless ``save_best=False``. Rank 0 alone
        validates (other ranks return {})."""
        if not self.world.is_main:
            return {}
        self._open()
        steps = self.learner.inner_steps
        curve = self.learner.adaptation_curve(self.val_tasks, max(steps, self.cfg.eval.steps))
        name = f"val_{self.learner.metric_name}"
        val = {name: curve[:, steps].mean().item(), f"{name}_eval_steps": curve[:, -1].mean().item()}
        self.last = {**self.last, **val}
        self._log({"iteration": self.iteration, **val}, training=False)
        self._call("on_evaluate", val)
        # Lower is better: validation MSE, or minus the validation accuracy.
        score = -val[name] if self.learner.metric_higher_is_better else val[name]
        if score < self.best:
            self.best = score
            if save_best:
                self.save(BEST)
        return val

    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint atomically: ``checkpoints/iter-<iteration>`` (keeping the last ``train.keep_last``)
        or ``checkpoints/<name>``. A periodic checkpoint also logs the iterations since the last training line,
        so that a run resumed from it logs the same lines. Refuses (DivergenceError) to write non-finite weights.
        Returns the path (None on ranks other than 0, which write nothing)."""
        self._open()
        weights = learner_tensors(self.learner)
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        # Checked on every rank (their weights are identical), so all stop together.
        if bad:  # never write a checkpoint that a later "last good checkpoint" message would point to
            raise self._diverged(f"by iteration {self.iteration}: {bad[0]} holds NaN/inf")
        if name is None:
            self._flush()
        if not self.world.is_main:
            return None
        info = {
            "iteration": self.iteration,
            "seconds": self.seconds,
            "best_val": self.best if math.isfinite(self.best) else None,
            "algorithm": self.learner.name,
            "config": self.cfg.to_dict(),
            "update": self.update,  # how the steps before it ran (a CUDA graph, one compiled call, the parts)
            "task_loop": self.learner.task_loop,  # how their tasks ran (vectorised, side by side, one at a time)
        }
        directory = self.run_dir / CHECKPOINTS / (name or checkpoint_name(self.iteration))
        path = save_training_state(directory, self.learner, self.optimizer, self.scheduler, self.generator, info)
        if name is None:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        self._call("on_save", path)
        return path

    def fit(self) -> dict[str, float]:
        """Train up to ``train.iterations``: validation every ``train.val_every``, checkpoints every
        ``train.checkpoint_every`` and at the end. Returns the last logged metrics."""
        t = self.cfg.train
        self._open()
        if self.iteration >= t.iterations and self.world.is_main:
            # Resumed after its last checkpoint: a kill while the last save pruned the older ones (a partly
            # deleted directory is still listed) is finished here, as the uninterrupted run left them.
            prune_checkpoints(self.run_dir, t.keep_last)
        bar = tqdm(
            total=t.iterations, initial=self.iteration, disable=not self.progress, desc=self.learner.name,
            unit="it", dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip
        # A compiled learner's first step compiles (about a minute for Conv-4 on a CPU): say so on the bar rather
        # than show a run stuck at its first iteration.
        compiling = self.learner._compiled is not None and self.start_iteration == self.iteration < t.iterations
        if compiling:
            bar.set_postfix_str("compiling the meta-step (first iteration)")
        try:
            while self.iteration < t.iterations:
                logged = self.last
                self.step()
                if compiling:  # (before the bar shows the step)
                    bar.set_postfix_str("", refresh=False)
                    compiling = False
                bar.update(1)
                it = self.iteration
                if self.last is not logged:
                    shown = {"loss": f"{self.last['loss']:.4f}"}
                    if self.last.get("pre_loss") is not None:  # none with learner.diagnostics = False
                        shown["pre"] = f"{self.last['pre_loss']:.3f}"
                    bar.set_postfix(shown, refresh=False)
                if it % t.val_every == 0 or it == t.iterations:
                    self.evaluate()
                if it % t.checkpoint_every == 0 or it == t.iterations:
                    self.save()
        finally:
            bar.close()
        return self.last

    def close(self) -> None:
        """Finish: callbacks' ``on_close`` (TensorBoard flushes here), then leave the torchrun process group."""
        try:
            self._call("on_close")
        finally:
            shutdown_world(self.world)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the learner ``cfg`` describes into ``run_dir`` (or continue it with ``resume=True``): a
    :class:`Trainer` and its :meth:`~Trainer.fit`. ``callbacks`` get the hooks of :mod:`metagrad.callbacks`;
    ``callback(iteration, metrics)`` is called at every training line of metrics.jsonl."""
    hooks = [*callbacks, *([_IterationCallback(callback)] if callback is not None else [])]
    with Trainer(cfg, run_dir, overwrite=overwrite, callbacks=hooks, progress=progress) as trainer:
        if resume:
            trainer.resume()
        last = trainer.fit()
    return TrainResult(trainer.learner, Path(run_dir), trainer.iteration, trainer.seconds, last, trainer.update)
