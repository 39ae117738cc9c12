"""The training loop: it learns, logs, keeps checkpoints, resumes bit for bit (also after SIGKILL), guards
against divergence and clips; plus the evaluator's statistics and fixed task sets."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metagrad import cli
from metagrad.algorithms import MetaLearner
from metagrad.build import build_learner, build_task
from metagrad.checkpoint import load_checkpoint
from metagrad.config import Config, load_config
from metagrad.errors import CheckpointError, DivergenceError
from metagrad.evaluate import TEST_SEED, VAL_SEED, evaluate, fixed_tasks, summarize
from metagrad.run import checkpoints, latest_checkpoint, load_learner, read_run_config
from metagrad.train import meta_lr_at, train

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.hidden=[8,8]",
    "train.meta_batch=4",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_tasks=10",
    "train.checkpoint_every=5",
    "train.keep_last=20",
    "train.threads=1",
    "eval.steps=2",
]


def cfg_of(*overrides: str) -> Config:
    return load_config(overrides=[*TINY, *overrides])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_seconds(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def assert_same_state(a: MetaLearner, b: MetaLearner) -> None:
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sa.keys() == sb.keys()
    for group in sa:
        assert sa[group].keys() == sb[group].keys(), group
        for key in sa[group]:
            x, y = sa[group][key], sb[group][key]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{group}.{key}"
            assert torch.equal(x, y), f"{group}.{key} differs (max |diff| {(x - y).abs().max().item():.3g})"


# ----- it learns -----------------------------------------------------------------------------------------


def test_maml_lowers_the_post_adaptation_loss(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            "model.hidden=[40,40]",
            "algorithm.inner_steps=2",
            "algorithm.inner_lr=0.03",
            "train.meta_lr=0.005",
            "train.iterations=300",
            "train.meta_batch=10",
            "train.log_every=50",
            "train.val_every=150",
            "train.val_tasks=20",
            "train.checkpoint_every=150",
            "train.threads=1",
            "eval.steps=2",
        ]
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.iterations == 300
    train_recs = [r for r in records(tmp_path / "run") if "loss" in r]
    first, last = train_recs[0], train_recs[-1]
    assert last["iteration"] == 300
    # Measured: last loss/pre_loss is 0.41-0.53 over seeds 0-3; before meta-training the two are within ~10 %.
    assert last["loss"] < 0.7 * last["pre_loss"], last
    assert last["loss"] < 0.75 * first["loss"], (first, last)
    # On the fixed validation tasks, against the same network before meta-training (adapted the same way).
    val_tasks = fixed_tasks(build_task(cfg), cfg.train.val_tasks, cfg.task.shots, "dense", VAL_SEED)
    untrained = build_learner(cfg).adaptation_curve(val_tasks, 2)[:, 2].mean().item()
    val = [r["val_mse"] for r in records(tmp_path / "run") if "val_mse" in r]
    assert val[-1] < 0.6 * untrained, (val, untrained)
    assert result.last["loss"] == last["loss"]


# ----- metrics and checkpoints ---------------------------------------------------------------------------


def test_metrics_jsonl_is_valid_and_ordered(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(cfg_of("train.iterations=23", "train.log_every=4", "train.val_every=10"), run, progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in recs)
    its = [r["iteration"] for r in recs]
    assert its == sorted(its)
    train_recs = [r for r in recs if "loss" in r]
    val_recs = [r for r in recs if "val_mse" in r]
    # Every log_every (4), every checkpoint (checkpoint_every=5, so a resume's log windows line up) and the end.
    assert [r["iteration"] for r in train_recs] == [4, 5, 8, 10, 12, 15, 16, 20, 23]
    assert [r["iteration"] for r in val_recs] == [10, 20, 23]
    for r in train_recs:
        assert {"loss", "pre_loss", "grad_norm", "lr", "seconds"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in ("loss", "pre_loss", "grad_norm", "lr", "seconds"))
    assert [r["seconds"] for r in train_recs] == sorted(r["seconds"] for r in train_recs)
    for r in val_recs:
        assert math.isfinite(r["val_mse"]) and math.isfinite(r["val_mse_eval_steps"])


def test_checkpoints_keep_only_the_last_n_plus_best(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(cfg_of("train.iterations=23", "train.keep_last=2", "train.val_every=5"), run, progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "iter-00000020", "iter-00000023"]
    assert [i for i, _ in checkpoints(run)] == [20, 23]
    best_meta = load_checkpoint(run / "checkpoints" / "best", weights_only=True)[2]
    vals = {r["iteration"]: r["val_mse"] for r in records(run) if "val_mse" in r}
    best_it = min(vals, key=vals.get)
    assert best_meta["iteration"] == best_it
    assert best_meta["best_val"] == vals[best_it]
    assert (run / "run.json").is_file() and (run / "config.toml").is_file()
    assert read_run_config(run) == cfg_of("train.iterations=23", "train.keep_last=2", "train.val_every=5")


def test_meta_lr_schedules() -> None:
    lin = load_config(overrides=["train.iterations=100", "train.lr_schedule=linear", "train.meta_lr_final=0.1"])
    cos = load_config(overrides=["train.iterations=100", "train.lr_schedule=cosine", "train.meta_lr=1.0"])
    const = load_config(overrides=["train.iterations=100"])
    assert meta_lr_at(lin, 0) == pytest.approx(1e-3)
    assert meta_lr_at(lin, 50) == pytest.approx(0.0505)
    assert meta_lr_at(lin, 100) == pytest.approx(0.1)
    assert meta_lr_at(lin, 500) == pytest.approx(0.1)
    assert meta_lr_at(cos, 0) == pytest.approx(1.0)
    assert meta_lr_at(cos, 50) == pytest.approx(0.5)
    assert meta_lr_at(cos, 100) == pytest.approx(0.0, abs=1e-12)
    assert meta_lr_at(const, 77) == 1e-3


def test_the_logged_lr_follows_the_schedule(tmp_path: Path) -> None:
    cfg = cfg_of("train.iterations=8", "train.log_every=1", "train.lr_schedule=cosine", "train.meta_lr=0.01")
    train(cfg, tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in records(tmp_path / "run") if "lr" in r]
    assert lrs == pytest.approx([meta_lr_at(cfg, i) for i in range(8)])


# ----- exact resume --------------------------------------------------------------------------------------

RESUME_CASES = {
    "maml": [],
    "reptile": [
        "algorithm.name=reptile",
        "algorithm.inner_optimizer=adam",
        "algorithm.inner_steps=3",
        "algorithm.inner_batch=5",
        "train.optimizer=sgd",
        "train.lr_schedule=linear",
        "train.meta_lr=0.5",
    ],
    "maml_enhanced": [
        "algorithm.name=maml_enhanced",
        "algorithm.inner_steps=2",
        "algorithm.epoch_iterations=7",
        "algorithm.msl_epochs=3",
        "algorithm.first_order_iterations=12",
        "train.lr_schedule=cosine",
    ],
}


@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_resume_after_losing_checkpoints_is_bit_for_bit(name: str, tmp_path: Path) -> None:
    cfg = cfg_of("train.iterations=30", *RESUME_CASES[name])
    full = train(cfg, tmp_path / "full", progress=False)
    assert full.learner.name == name
    if name != "maml":
        assert full.learner.meta_state or full.learner.extra_state  # the state that must survive too

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for it, path in checkpoints(cut):
        if it > 15:
            shutil.rmtree(path)
    assert latest_checkpoint(cut).name == "iter-00000015"
    # Something that makes the run differ unless the resume restores everything.
    resumed = train(read_run_config(cut), cut, resume=True, progress=False)
    assert resumed.iterations == 30

    assert_same_state(full.learner, resumed.learner)
    assert_same_state(full.learner, load_learner(cut)[1])
    w_full, t_full, m_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "iter-00000030")
    w_cut, t_cut, m_cut = load_checkpoint(cut / "checkpoints" / "iter-00000030")
    assert w_full.keys() == w_cut.keys() and t_full.keys() == t_cut.keys()
    for k in t_full:  # optimizer moments and the task RNG state
        assert torch.equal(t_full[k], t_cut[k]), k
    assert m_full["optimizer"] == m_cut["optimizer"]
    assert without_seconds(records(tmp_path / "full")) == without_seconds(records(cut))


def test_resume_restores_state_not_just_weights(tmp_path: Path) -> None:
    """The same cut, but with the optimizer state thrown away: the result must differ (the test above can fail)."""
    cfg = cfg_of("train.iterations=20")
    full = train(cfg, tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for it, path in checkpoints(cut):
        if it > 10:
            shutil.rmtree(path)
    ckpt = cut / "checkpoints" / "iter-00000010"
    trainer_file = ckpt / "trainer.safetensors"
    tensors = load_file(trainer_file)
    tensors = {k: (torch.zeros_like(v) if k.startswith("optim.") and "exp_avg" in k else v) for k, v in tensors.items()}
    save_file(tensors, trainer_file)
    meta = json.loads((ckpt / "trainer.json").read_text())
    meta["sha256"]["trainer.safetensors"] = hashlib.sha256(trainer_file.read_bytes()).hexdigest()
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    resumed = train(cfg, cut, resume=True, progress=False)
    assert not torch.equal(full.learner.params["0.weight"], resumed.learner.params["0.weight"])


def test_extending_a_finished_run_equals_a_longer_run(tmp_path: Path) -> None:
    longer = train(cfg_of("train.iterations=20"), tmp_path / "long", progress=False)
    train(cfg_of("train.iterations=10"), tmp_path / "short", progress=False)
    extended = train(cfg_of("train.iterations=20"), tmp_path / "short", resume=True, progress=False)
    assert extended.iterations == 20
    assert_same_state(longer.learner, extended.learner)


def test_a_finished_run_resumed_finishes_the_pruning_a_kill_interrupted(tmp_path: Path) -> None:
    """Killed while its last save deleted the older checkpoints (here: one left whole, one left half deleted),
    a run resumed with nothing left to train keeps the last ``keep_last``, as the uninterrupted run did."""
    run = tmp_path / "run"
    cfg = cfg_of("train.iterations=12", "train.keep_last=2")
    train(cfg, run, progress=False)
    (first, source), (last, _) = checkpoints(run)
    assert last == 12
    for it, files in ((1, None), (2, 1)):  # a whole older checkpoint, and one with only its first file left
        old = run / "checkpoints" / f"iter-{it:08d}"
        shutil.copytree(source, old)
        for extra in sorted(old.iterdir())[files:] if files else ():
            extra.unlink()
    assert [i for i, _ in checkpoints(run)] == [1, 2, first, 12]
    resumed = train(cfg, run, resume=True, progress=False)
    assert resumed.iterations == 12
    assert [i for i, _ in checkpoints(run)] == [first, 12]


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    train(cfg_of("train.iterations=5"), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="own config"):
        train(cfg_of("train.iterations=10", "model.hidden=[4,4]"), tmp_path / "run", resume=True, progress=False)


def test_resume_without_any_checkpoint_does_not_duplicate_metrics(tmp_path: Path) -> None:
    """A run killed before its first checkpoint restarts from scratch on --resume; its metrics must not hold the
    killed attempt's lines as well (train.py only truncates metrics.jsonl when a checkpoint is restored)."""
    run = tmp_path / "run"
    cfg = cfg_of("train.iterations=10", "train.checkpoint_every=1000")
    train(cfg, run, progress=False)
    reference = records(run)
    shutil.rmtree(run / "checkpoints")  # as if killed just before the only checkpoint was written
    train(cfg, run, resume=True, progress=False)
    assert without_seconds(records(run)) == without_seconds(reference)


# ----- SIGKILL and resume --------------------------------------------------------------------------------

KILL_CFG = [
    "model.hidden=[16,16]",
    "train.iterations=200",
    "train.meta_batch=4",
    "train.checkpoint_every=5",
    "train.keep_last=2",
    "train.log_every=5",
    "train.val_every=50",
    "train.val_tasks=10",
    "train.threads=1",
    "eval.steps=2",
]


def _latest_iteration(run: Path) -> int:
    found = checkpoints(run)
    return found[-1][0] if found else -1


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "metagrad", "train", "--no-progress", *args],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = train(load_config(overrides=KILL_CFG), tmp_path / "reference", progress=False)
    run, log = tmp_path / "killed", tmp_path / "log.txt"
    kills = []
    # Kill 0.2 s and 0.8 s after the process has written a checkpoint of its own (so every attempt makes
    # progress; the interpreter's start-up alone takes seconds), landing anywhere: mid-step, mid-checkpoint,
    # mid-pruning, mid-log.
    for attempt, delay in enumerate((0.2, 0.8)):
        args = ["--out", str(run), *KILL_CFG] if attempt == 0 else ["--resume", "--out", str(run)]
        before = _latest_iteration(run)
        proc = _spawn(args, log)
        deadline = time.monotonic() + 60
        seen = None
        while proc.poll() is None and time.monotonic() < deadline:
            if seen is None and _latest_iteration(run) > before:
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= delay:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(_latest_iteration(run))
        proc.wait(timeout=30)
        if proc.returncode == 0:
            break  # finished before the kill: nothing left to interrupt
        assert proc.returncode == -signal.SIGKILL, log.read_text()
    assert len(kills) == 2, f"the process was killed only {len(kills)} times: {kills}"
    final = subprocess.run(
        [sys.executable, "-m", "metagrad", "train", "--resume", "--out", str(run), "--no-progress"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert final.returncode == 0, final.stderr
    assert "200 iterations" in final.stdout

    _, learner, meta = load_learner(run)
    assert meta["iteration"] == 200
    assert_same_state(reference.learner, learner)
    assert without_seconds(records(run)) == without_seconds(records(tmp_path / "reference"))
    assert [i for i, _ in checkpoints(run)] == [195, 200]


# ----- divergence and clipping ---------------------------------------------------------------------------


def test_divergence_raises_naming_the_iteration(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"diverged at iteration 1\b") as info:
        train(cfg_of("train.iterations=10", "algorithm.inner_lr=1e6"), tmp_path / "run", progress=False)
    assert isinstance(info.value, RuntimeError)
    assert "inner_lr=1000000.0" in str(info.value)
    assert "none yet" in str(info.value)


def test_divergence_in_the_cli_exits_1_and_the_last_good_checkpoint_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--no-progress", *TINY, "train.iterations=10"]) == 0
    _, before, _ = load_learner(run)
    capsys.readouterr()

    code = cli.main(
        ["train", "--resume", "--out", str(run), "--no-progress", "train.iterations=40", "train.meta_lr=1e9"]
    )
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.search(r"diverged at iteration (\d+)", lines[0])
    assert m and int(m.group(1)) > 10, lines[0]
    assert "iter-00000010" in lines[0]
    assert not out.strip().startswith("trained")

    _, after, meta = load_learner(run)
    assert meta["iteration"] == 10
    assert_same_state(before, after)
    assert all(torch.isfinite(v).all() for v in after.params.values())


def test_the_checkpoint_named_after_divergence_is_finite(tmp_path: Path) -> None:
    """An SGD step at lr 3e38 overflows the weights to inf; the divergence guard only looks at the loss and the
    gradient *before* the step, so that checkpoint is written and then named as the "last good checkpoint"."""
    cfg = cfg_of("train.iterations=10", "train.optimizer=sgd", "train.meta_lr=3e38", "train.checkpoint_every=1")
    with pytest.raises(DivergenceError) as info:
        train(cfg, tmp_path / "run", progress=False)
    named = str(info.value).rsplit("last good checkpoint: ", 1)[1]
    if named != "none yet":
        _, learner, _ = load_learner(tmp_path / "run", named)
        bad = [k for k, v in learner.params.items() if not torch.isfinite(v).all()]
        assert not bad, f"{named} (named as the last good checkpoint) holds non-finite weights {bad}"


def test_grad_clip_caps_the_update(tmp_path: Path) -> None:
    base = ["train.iterations=1", "train.optimizer=sgd", "train.meta_lr=1.0", "train.checkpoint_every=1"]
    start = build_learner(cfg_of(*base)).params

    def update_norm(learner: MetaLearner) -> float:
        return math.sqrt(sum(((learner.params[k] - start[k]) ** 2).sum().item() for k in start))

    free = train(cfg_of(*base), tmp_path / "free", progress=False)
    clipped = train(cfg_of(*base, "train.grad_clip=0.01"), tmp_path / "clipped", progress=False)
    grad_norm = records(tmp_path / "free")[0]["grad_norm"]
    assert update_norm(free.learner) == pytest.approx(grad_norm, rel=1e-3)
    assert grad_norm > 0.1  # so the cap below does something
    assert update_norm(clipped.learner) <= 0.01 * (1 + 1e-4)
    assert update_norm(clipped.learner) == pytest.approx(0.01, rel=1e-3)


def test_grad_clip_keeps_an_aggressive_run_finite(tmp_path: Path) -> None:
    aggressive = ["train.iterations=20", "train.optimizer=sgd", "train.meta_lr=300"]
    with pytest.raises(DivergenceError):
        train(cfg_of(*aggressive), tmp_path / "free", progress=False)
    result = train(cfg_of(*aggressive, "train.grad_clip=1e-3"), tmp_path / "clipped", progress=False)
    assert result.iterations == 20
    assert all(math.isfinite(r.get("loss", 0.0)) for r in records(tmp_path / "clipped"))
    assert all(torch.isfinite(v).all() for v in result.learner.params.values())


# ----- evaluation statistics and task sets ---------------------------------------------------------------


def test_summarize_matches_a_hand_computation() -> None:
    rows = [[1.0, 2.0, 0.5], [3.0, 4.0, 0.5], [6.0, 9.0, 0.5], [2.0, 1.0, 0.5]]
    mean, ci = summarize(torch.tensor(rows, dtype=torch.float32))
    n = len(rows)
    for j in range(3):
        col = [r[j] for r in rows]
        mu = sum(col) / n
        sd = math.sqrt(sum((c - mu) ** 2 for c in col) / (n - 1))  # Bessel
        assert mean[j] == pytest.approx(mu, rel=1e-12)
        assert ci[j] == pytest.approx(1.96 * sd / math.sqrt(n), rel=1e-12)
    assert ci[2] == 0.0
    assert summarize(torch.tensor([[2.0, 3.0]]))[1] == [0.0, 0.0]  # one task: no spread
    mean_nan, _ = summarize(torch.tensor([[1.0], [float("nan")]]))
    assert math.isnan(mean_nan[0])  # a diverged task is not silently dropped


def test_fixed_tasks_are_fixed_and_independent_of_seeds() -> None:
    dist = build_task(Config())
    torch.manual_seed(0)
    a = fixed_tasks(dist, 20, 5, "dense")
    torch.manual_seed(12345)
    torch.rand(100)
    b = fixed_tasks(dist, 20, 5, "dense")
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.query_x.shape == (20, 100, 1)  # the dense grid
    paper = fixed_tasks(dist, 20, 5, "paper")
    assert paper.query_x.shape == (20, 5, 1)
    val = fixed_tasks(dist, 20, 5, "dense", VAL_SEED)
    assert not torch.equal(val.support_x, a.support_x)
    assert TEST_SEED >= 10**9 and VAL_SEED >= 10**9  # beyond every valid training seed
    # The training seed changes neither the test tasks nor the evaluation.
    for seed in (0, 1, 999_999_999):
        cfg = load_config(overrides=[f"train.seed={seed}"])
        t = fixed_tasks(build_task(cfg), 20, 5, "dense")
        assert torch.equal(t.support_x, a.support_x) and torch.equal(t.support_y, a.support_y)
        first_training_batch = build_task(cfg).sample(25, 5, 5, torch.Generator().manual_seed(seed))
        assert not torch.equal(first_training_batch.support_x[:20], a.support_x)


def test_evaluate_is_deterministic_and_shaped() -> None:
    learner = build_learner(load_config(overrides=["model.hidden=[8,8]"]))
    dist = build_task(Config())
    torch.manual_seed(1)
    r1 = evaluate(learner, dist, shots=(5, 10), steps=3, tasks=15)
    torch.manual_seed(2)
    r2 = evaluate(learner, dist, shots=(5, 10), steps=3, tasks=15)
    assert r1 == r2
    assert [r["shots"] for r in r1["results"]] == [5, 10]
    for r in r1["results"]:
        assert r["steps"] == [0, 1, 2, 3] and len(r["mse"]) == 4 and len(r["ci95"]) == 4
    assert (r1["algorithm"], r1["task"], r1["scoring"], r1["tasks"]) == ("maml", "sinusoid", "dense", 15)
    curve = learner.adaptation_curve(fixed_tasks(dist, 15, 5, "dense").to("cpu", torch.float32), 3)
    assert r1["results"][0]["mse"] == pytest.approx(summarize(curve)[0])


def test_resume_may_change_task_workers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """task.workers (decoding processes) cannot change results: resume accepts it; any other [task] key it refuses."""
    from test_images_sets import make_split_folders

    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    data = make_split_folders(tmp_path / "set", per_split=(5, 5, 5), per_class=6)
    run = tmp_path / "run"
    tiny = ["task.image_size=16", "task.queries=2", "model.channels=4", "train.meta_batch=1", "train.val_tasks=2",
            "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1", "train.threads=1"]  # fmt: skip
    first = ["train", "--config", ROOT / "configs/miniimagenet/maml.toml", "--out", run, "--no-progress"]
    assert cli.main([str(a) for a in [*first, f"task.data={data}", "task.workers=1", *tiny, "train.iterations=2"]]) == 0
    resumed = ["train", "--resume", "--out", str(run), "--no-progress", "train.iterations=4"]
    assert cli.main([*resumed, "task.workers=2"]) == 0
    assert read_run_config(run).task.workers == 2
    capsys.readouterr()
    assert cli.main([*resumed, "task.workers=1", "task.augment=true"]) == 2  # still strict about the rest
    assert "own config" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["maml", "maml_enhanced", "metasgd", "reptile", "cavia", "imaml"])
def test_a_learner_is_built_from_the_seed_alone(name: str) -> None:
    """Every tensor of a learner built from a config (the network's and the algorithm's own, such as CAVIA's
    context weights) comes from train.seed, whatever the global RNG's state; the global RNG is left alone."""
    cfg = cfg_of(f"algorithm.name={name}")
    torch.manual_seed(1)
    first = build_learner(cfg).state_dict()
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = build_learner(cfg).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in first.items():
        assert torch.equal(v, second[k]), k
    other = build_learner(cfg_of(f"algorithm.name={name}", "train.seed=1")).state_dict()
    assert any(not torch.equal(v, other[k]) for k, v in first.items() if v.is_floating_point())
