"""The public Trainer driven from a user's own loop: the same run as `train`, save/resume bit for bit, callbacks,
TensorBoard, and run records that name where their components live."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metagrad import Callback, MissingDependencyError, Trainer, train
from metagrad.checkpoint import checkpoints, load_checkpoint
from metagrad.cli import main
from metagrad.config import Config, load_config
from metagrad.errors import RunError
from metagrad.run import load_learner
from metagrad.train import meta_lr_at

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"

TINY = [
    "model.hidden=[8,8]",
    "train.meta_batch=4",
    "train.log_every=3",
    "train.val_every=4",
    "train.val_tasks=6",
    "train.checkpoint_every=4",
    "train.keep_last=20",
    "train.threads=1",
    "eval.steps=2",
]
# Adam moments, a cosine schedule and learned per-step rates: state a resume must restore exactly.
ENHANCED = [
    "algorithm.name=maml_enhanced",
    "algorithm.inner_steps=2",
    "algorithm.epoch_iterations=3",
    "algorithm.msl_epochs=2",
    "train.lr_schedule=cosine",
    "train.meta_lr=0.01",
]


def cfg_of(*overrides: str) -> Config:
    return load_config(overrides=[*TINY, *overrides])


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (run / "metrics.jsonl").open()]


def assert_same_learner(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def user_loop(trainer: Trainer, until: int) -> list[dict[str, float]]:
    """A user's loop with the schedule `train.*_every` describes."""
    t = trainer.cfg.train
    out = []
    while trainer.iteration < until:
        out.append(trainer.step())
        if trainer.iteration % t.val_every == 0 or trainer.iteration == t.iterations:
            trainer.evaluate()
        if trainer.iteration % t.checkpoint_every == 0 or trainer.iteration == t.iterations:
            trainer.save()
    return out


def test_a_user_loop_is_the_same_run_as_train(tmp_path: Path) -> None:
    cfg = cfg_of("train.iterations=10", *ENHANCED)
    reference = train(cfg, tmp_path / "train", progress=False)
    with Trainer(cfg, tmp_path / "loop") as trainer:
        assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.LRScheduler)
        steps = user_loop(trainer, 10)
    assert_same_learner(reference.learner, trainer.learner)
    assert records(tmp_path / "train") == records(tmp_path / "loop")
    assert [i for i, _ in checkpoints(tmp_path / "loop")] == [4, 8, 10]
    assert (tmp_path / "loop" / "checkpoints" / "best").is_dir()
    # step() returns that iteration's metrics; the lr is the schedule's at that iteration.
    assert [s["lr"] for s in steps] == pytest.approx([meta_lr_at(cfg, i) for i in range(10)])
    assert all({"loss", "pre_loss", "grad_norm", "lr"} <= s.keys() for s in steps)


def test_save_and_resume_from_a_user_loop_is_bit_identical(tmp_path: Path) -> None:
    cfg = cfg_of("train.iterations=11", *ENHANCED)
    with Trainer(cfg, tmp_path / "full") as full:
        user_loop(full, 7)
        full.save()  # at an iteration that is not a checkpoint_every multiple: the log window is flushed too
        user_loop(full, 11)

    with Trainer(cfg, tmp_path / "cut") as first:
        user_loop(first, 7)
        saved = first.save()
        first.step()  # lost: the resume starts from the checkpoint at 7
    assert saved == tmp_path / "cut" / "checkpoints" / "iter-00000007"
    with Trainer(cfg, tmp_path / "cut") as second:
        assert second.resume() == saved
        assert second.iteration == second.start_iteration == 7
        user_loop(second, 11)

    assert_same_learner(full.learner, second.learner)
    assert records(tmp_path / "full") == records(tmp_path / "cut")
    a, b = (load_checkpoint(r / "checkpoints" / "iter-00000011") for r in (tmp_path / "full", tmp_path / "cut"))
    for k in a[1]:  # optimizer moments and the task RNG state
        assert torch.equal(a[1][k], b[1][k]), k
    assert a[2]["scheduler"] == b[2]["scheduler"] and a[2]["scheduler"]["last_epoch"] == 11
    assert a[2]["optimizer"] == b[2]["optimizer"]


def test_a_checkpoint_without_scheduler_state_resumes_on_the_same_schedule(tmp_path: Path) -> None:
    """Checkpoints written before the schedule was a torch scheduler hold none: the iteration alone sets it."""
    cfg = cfg_of("train.iterations=8", *ENHANCED)
    full = train(cfg, tmp_path / "full", progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "iter-00000008")
    meta_path = tmp_path / "old" / "checkpoints" / "iter-00000004" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    del meta["scheduler"]
    meta_path.write_text(json.dumps(meta))
    resumed = train(cfg, tmp_path / "old", resume=True, progress=False)
    assert_same_learner(full.learner, resumed.learner)


def test_the_schedule_scales_every_group_and_follows_a_changed_config_on_resume(tmp_path: Path) -> None:
    cfg = cfg_of("train.iterations=8", *ENHANCED, "train.meta_state_lr=0.1")
    with Trainer(cfg, tmp_path / "run") as trainer:
        for i in range(8):
            lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
            assert lrs["params"] == pytest.approx(meta_lr_at(cfg, i))
            assert lrs["meta"] == pytest.approx(0.1 * meta_lr_at(cfg, i) / cfg.train.meta_lr)
            trainer.step()
        trainer.save()
    # [train] keys may change on resume: the schedule is the new config's, at the restored iteration.
    longer = cfg_of("train.iterations=16", *ENHANCED, "train.meta_state_lr=0.1", "train.meta_lr=0.02")
    with Trainer(longer, tmp_path / "run") as trainer:
        assert trainer.resume() is not None and trainer.iteration == 8
        lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert lrs["params"] == pytest.approx(meta_lr_at(longer, 8))
        assert lrs["meta"] == pytest.approx(0.1 * meta_lr_at(longer, 8) / 0.02)
        assert trainer.step()["lr"] == pytest.approx(meta_lr_at(longer, 8))


def test_resume_comes_before_the_first_step_and_needs_a_run(tmp_path: Path) -> None:
    cfg = cfg_of("train.iterations=4")
    with Trainer(cfg, tmp_path / "run") as trainer:
        trainer.step()
        with pytest.raises(RunError, match="before the first step"):
            trainer.resume()
    with Trainer(cfg, tmp_path / "nothing") as trainer, pytest.raises(RunError, match="does not exist"):
        trainer.resume()
    # A second trainer on the same directory does not silently write into the first one's run.
    with Trainer(cfg, tmp_path / "run") as trainer, pytest.raises(RunError, match="already holds a run"):
        trainer.step()


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.calls.append(("step", trainer.iteration))

    def on_log(self, trainer: Trainer, record: dict) -> None:
        self.calls.append(("log", record))

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.calls.append(("evaluate", dict(metrics)))

    def on_save(self, trainer: Trainer, path: Path) -> None:
        self.calls.append(("save", path.name))

    def on_close(self, trainer: Trainer) -> None:
        self.calls.append(("close", trainer.iteration))


def test_callbacks_see_every_step_log_line_validation_and_checkpoint(tmp_path: Path) -> None:
    rec, seen = Recorder(), []

    class OnlyLog:  # any object with some of the hooks will do
        def on_log(self, trainer: Trainer, record: dict) -> None:
            seen.append(record["iteration"])

    legacy: list[int] = []
    run = tmp_path / "run"
    cfg = cfg_of("train.iterations=8")
    train(cfg, run, progress=False, callbacks=[rec, OnlyLog()], callback=lambda it, m: legacy.append(it))
    kinds = [k for k, _ in rec.calls]
    assert [v for k, v in rec.calls if k == "step"] == list(range(1, 9))
    logged = [v for k, v in rec.calls if k == "log"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in logged] == records(run)  # the metrics.jsonl lines
    assert seen == [r["iteration"] for r in records(run)]
    assert legacy == [r["iteration"] for r in records(run) if "loss" in r]  # training lines only
    assert [v for k, v in rec.calls if k == "evaluate"] == [
        {k: v for k, v in r.items() if k != "iteration"} for r in records(run) if "val_mse" in r
    ]
    assert [v for k, v in rec.calls if k == "save"].count("iter-00000008") == 1
    assert "best" in [v for k, v in rec.calls if k == "save"]
    assert kinds[-1] == "close" and kinds.count("close") == 1


def test_tensorboard_writes_the_metrics_as_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(cfg_of("train.iterations=8", "train.tensorboard=true"), run, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lines = records(run)
    for key in ("loss", "pre_loss", "grad_norm", "lr", "val_mse"):
        expected = [(r["iteration"], r[key]) for r in lines if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"metagrad\[tensorboard\]"):
        Trainer(cfg_of("train.iterations=2", "train.tensorboard=true"), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    argv = ["train", "--out", str(tmp_path / "b"), "--no-progress", *TINY, "train.tensorboard=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'metagrad[tensorboard]'" in err[0]
    # Not asked for: never imported.
    assert train(cfg_of("train.iterations=2"), tmp_path / "c", progress=False).iterations == 2


def test_a_run_of_components_registered_by_name_loads_without_the_import(tmp_path: Path, monkeypatch) -> None:
    """run.json records module:qualname, so `metagrad eval` finds a component named 'wave2d' in a new process
    that has not imported the user's package (as long as it is importable)."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    import wave2d_plugin  # noqa: F401 - registers 'wave2d' and 'resmlp'

    run = tmp_path / "run"
    cfg = cfg_of("task.name=wave2d", "model.name=resmlp", "model.width=8", "train.iterations=2")
    train(cfg, run, progress=False)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["task"]["name"] == "wave2d"
    assert record["components"] == {
        "task": "wave2d_plugin:Wave2D",
        "model": "wave2d_plugin:ResMLP",
        "algorithm": "metagrad.algorithms.maml:MAML",
    }
    assert type(load_learner(run)[1].model).__name__ == "ResMLP"

    def metagrad(*args: str, path: str) -> subprocess.CompletedProcess:
        # The plugin folder (or none), then this checkout's src: metagrad need not be pip-installed.
        paths = [path, str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        cmd = [sys.executable, "-m", "metagrad", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    ok = metagrad("eval", str(run), "--tasks", "4", "--shots", "5", "--steps", "1", path=str(PLUGINS))
    assert ok.returncode == 0, ok.stderr
    assert "wave2d" in ok.stdout
    gone = metagrad("eval", str(run), "--tasks", "4", path="")
    assert gone.returncode == 2
    assert gone.stderr.strip().count("\n") == 0 and "'wave2d_plugin'" in gone.stderr, gone.stderr


def test_fit_with_a_progress_bar_and_diagnostics_off(tmp_path: Path) -> None:
    """learner.diagnostics = False logs no pre_loss: the progress bar shows the loss alone. Turned off in the middle
    of a logging window, the window's pre_loss is the mean of the iterations that had it (it was a KeyError)."""
    with Trainer(cfg_of("train.iterations=6"), tmp_path / "run", progress=True) as trainer:
        first = trainer.step()
        trainer.learner.diagnostics = False
        last = trainer.fit()
    assert "pre_loss" not in last and "loss" in last
    window = next(r for r in records(tmp_path / "run") if r["iteration"] == 3 and "loss" in r)
    assert window["pre_loss"] == first["pre_loss"]


class _RecordedBar:
    """Stands in for tqdm: records each text the bar would show after its numbers, with the count shown then."""

    shown: list[tuple[str, int]] = []

    def __init__(self, **kwargs) -> None:
        self.n = kwargs["initial"]

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.shown.append((text, self.n))

    def set_postfix(self, values: dict, refresh: bool = True) -> None:
        pass

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass


def test_the_progress_bar_says_that_a_compiled_first_step_compiles(tmp_path: Path, monkeypatch) -> None:
    """A compiled learner's first step in a process compiles (a minute for Conv-4 on a CPU): the bar says so until
    that step is shown, also after a resume; an eager learner's bar says nothing of it."""
    monkeypatch.setattr(sys.modules[Trainer.__module__], "tqdm", _RecordedBar)  # (metagrad.train, the module)
    monkeypatch.setattr(_RecordedBar, "shown", [])
    message = "compiling the meta-step (first iteration)"
    with Trainer(cfg_of("train.iterations=4"), tmp_path / "run", progress=True) as trainer:
        trainer.learner.compile(backend="eager")  # (Dynamo's trace alone: what the bar reports is the same)
        trainer.fit()
    assert _RecordedBar.shown == [(message, 0), ("", 0)]  # cleared before the first step is shown
    _RecordedBar.shown.clear()
    with Trainer(cfg_of("train.iterations=5"), tmp_path / "run", progress=True) as resumed:
        resumed.learner.compile(backend="eager")
        resumed.resume()
        resumed.fit()
    assert _RecordedBar.shown == [(message, 4), ("", 4)]
    _RecordedBar.shown.clear()
    with Trainer(cfg_of("train.iterations=2"), tmp_path / "eager", progress=True) as eager:
        eager.fit()
    assert _RecordedBar.shown == []
