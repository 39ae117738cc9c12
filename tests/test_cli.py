"""The ``metagrad`` command: bad input exits 2 with one line and writes nothing; train/eval/plot work, in
process and (once) through the installed console script."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metagrad import cli
from metagrad.run import checkpoints, load_learner

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = [
    "model.hidden=[8,8]",
    "train.iterations=20",
    "train.meta_batch=4",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_tasks=10",
    "train.checkpoint_every=10",
    "train.threads=1",
    "eval.steps=2",
    "eval.tasks=20",
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``metagrad.cli.main(argv)`` -> (exit code, stdout, stderr); argparse's SystemExit counts as an exit code."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (directories as 'dir')."""
    return {
        str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--out", str(run), "--no-progress", *TINY]) == 0
    torch.set_num_threads(threads)
    return run


# ----- bad input: exit 2, one line, nothing written ------------------------------------------------------


def _copy_run(trained: Path, tmp: Path) -> Path:
    shutil.copytree(trained, tmp / "out")
    return tmp / "out"


def _write(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


# Each case: (argv builder taking (tmp_path, trained run), phrase expected in the one stderr line).
BAD: dict[str, tuple[Callable[[Path, Path], list], str]] = {
    "unknown override key": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "train.iteratons=5"],
        "unknown key train.iteratons (did you mean 'iterations'?)",
    ),
    "unknown override section": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "trian.iterations=5"],
        "did you mean 'train'",
    ),
    "misspelled algorithm": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "algorithm.name=mamll"],
        "did you mean 'maml'",
    ),
    "negative meta_lr": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "train.meta_lr=-0.001"],
        "train.meta_lr must be a finite number >= 0",
    ),
    "wrong type": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "train.iterations=1.5"],
        "train.iterations must be an integer",
    ),
    "malformed override": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "iterations=5"],
        "section.key=value",
    ),
    "missing config file": (
        lambda t, r: ["train", "--config", t / "missing.toml", "--out", t / "out", "--no-progress"],
        "does not exist",
    ),
    "invalid TOML": (
        lambda t, r: ["train", "--config", _write(t, "bad.toml", "[train\nx = = 1\n"), "--out", t / "out"],
        "is not valid TOML",
    ),
    "unknown key in config file": (
        lambda t, r: ["train", "--config", _write(t, "c.toml", "[model]\nhiden = [8]\n"), "--out", t / "out"],
        "did you mean 'hidden'",
    ),
    "eval of a nonexistent run": (
        lambda t, r: ["eval", t / "nope"],
        "does not exist",
    ),
    "eval of a directory that is not a run": (
        lambda t, r: ["eval", _plain_dir(t)],
        "is not a metagrad run",
    ),
    "eval of a run without checkpoints": (
        lambda t, r: ["eval", _strip_checkpoints(_copy_run(r, t))],
        "no latest checkpoint",
    ),
    "train into an existing run": (
        lambda t, r: ["train", "--out", _copy_run(r, t), "--no-progress", *TINY],
        "already holds a run",
    ),
    "train into a non-empty directory": (
        lambda t, r: ["train", "--out", _write(t, "keep.txt", "mine").parent, "--no-progress", *TINY],
        "is not empty and is not a metagrad run",
    ),
    "resume of a nonexistent run": (
        lambda t, r: ["train", "--resume", "--out", t / "out", "--no-progress"],
        "does not exist",
    ),
    "resume without --out": (
        lambda t, r: ["train", "--resume", "--no-progress"],
        "--resume needs --out",
    ),
    "eval --shots 0": (
        lambda t, r: ["eval", _copy_run(r, t), "--shots", "0"],
        "must be positive",
    ),
    "eval --steps not a number": (
        lambda t, r: ["eval", _copy_run(r, t), "--steps", "ten"],
        "is not an integer",
    ),
    "eval --scoring unknown": (
        lambda t, r: ["eval", _copy_run(r, t), "--scoring", "sparse"],
        "invalid choice",
    ),
    "eval --bn-statistics running of a transductive run": (
        lambda t, r: ["eval", _copy_run(r, t), "--bn-statistics", "running"],
        "need a model with batch-norm running statistics (model.bn = 'per_step'",
    ),
    "per-step batch norm on the MLP": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "model.bn=per_step"],
        "unknown key model.bn for model 'mlp'",
    ),
    "running BN statistics without per-step BN": (
        lambda t, r: ["train", "--out", t / "out", "--no-progress", "eval.bn_statistics=running"],
        "needs a model with batch-norm running statistics",
    ),
    "unknown flag": (
        lambda t, r: ["train", "--out", t / "out", "--bogus"],
        "unrecognized arguments: --bogus",
    ),
    "no command": (
        lambda t, r: [],
        "required",
    ),
}


def _plain_dir(tmp: Path) -> Path:
    (tmp / "plain").mkdir()
    return _write(tmp / "plain", "notes.txt", "hi").parent


def _strip_checkpoints(run: Path) -> Path:
    shutil.rmtree(run / "checkpoints")
    return run


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case: str, tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, phrase = BAD[case]
    argv = build(tmp_path, trained)
    out_existed = (tmp_path / "out").exists()
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metagrad"), lines[0]
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in err
    if not out_existed:
        assert not (tmp_path / "out").exists(), f"{case}: --out was created"
    assert snapshot(tmp_path) == before, f"{case}: files were written or changed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train.py creates the run directory (init_run) before resolving the device, so this currently leaves an
    empty run behind in --out."""
    code, out, err = run_cli(["train", "--out", tmp_path / "out", "--device", "cuda", "--no-progress", *TINY], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "not available" in lines[0], err
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_eval_device_cuda_without_cuda_exits_2(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["eval", trained, "--device", "cuda"], capsys)
    assert code == 2 and "not available" in err and len(err.strip().splitlines()) == 1


def test_existing_run_is_untouched_without_overwrite(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(trained, tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(["train", "--out", run, "--no-progress", *TINY, "train.iterations=5"], capsys)
    assert code == 2 and "--overwrite" in err and "--resume" in err
    assert snapshot(run) == before


def test_absurd_learning_rate_never_prints_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train.meta_lr=1e300 passes validation (finite) but overflows float32 in the SGD step; today that escapes
    as a RuntimeError traceback instead of a DivergenceError (exit 1) or a ConfigError (exit 2)."""
    code, _, err = run_cli(
        ["train", "--out", tmp_path / "out", "--no-progress", *TINY, "train.optimizer=sgd", "train.meta_lr=1e300"],
        capsys,
    )
    assert code in (1, 2)
    assert len(err.strip().splitlines()) == 1, err


def test_eval_json_into_a_missing_directory_is_not_a_traceback(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json DIR/x.json`` with DIR absent: either create DIR or exit 2 with one line (today: FileNotFoundError)."""
    run = _copy_run(trained, tmp_path)
    target = tmp_path / "missing" / "result.json"
    code, _, err = run_cli(["eval", run, "--tasks", "5", "--steps", "1", "--json", target], capsys)
    if code == 0:
        assert json.loads(target.read_text())["tasks"] == 5
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "missing" in err


# ----- what works ----------------------------------------------------------------------------------------


def test_train_eval_plot_in_process(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(trained, tmp_path)
    code, out, err = run_cli(["plot", run], capsys)
    assert code == 2 and "no eval.json yet" in err

    code, out, err = run_cli(["eval", run, "--tasks", "20", "--steps", "2", "--shots", "5", "10"], capsys)
    assert code == 0, err
    assert "maml on sinusoid, 20 tasks, dense scoring" in out
    assert "checkpoint at iteration 20" in out
    result = json.loads((run / "eval.json").read_text())
    assert [r["shots"] for r in result["results"]] == [5, 10]
    assert result["results"][0]["steps"] == [0, 1, 2]

    code, out, err = run_cli(["plot", run, "--out", tmp_path / "fig.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_MAGIC

    code, out, err = run_cli(["eval", run, "--tasks", "20", "--steps", "2", "--checkpoint", "best"], capsys)
    assert code == 0, err
    # Defaults come from the run's config: eval.shots = [5, 10, 20].
    assert [r["shots"] for r in json.loads((run / "eval.json").read_text())["results"]] == [5, 10, 20]


def test_train_prints_a_summary_and_resume_continues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--out", run, "--no-progress", *TINY, "train.iterations=10",
                              "train.device=cpu"], capsys)  # fmt: skip
    assert code == 0, err
    assert "trained maml for 10 iterations" in out and f"metagrad eval {run}" in out
    assert "update: separate parts (the learner is not compiled)" in out  # (how the update ran: Trainer.update)
    assert "\ntasks: vectorised (vmap)\n" in out  # (how the tasks ran: learner.task_loop)
    (saved,) = [i for i, _ in checkpoints(run)]
    info = json.loads((run / "checkpoints" / f"iter-{saved:08d}" / "trainer.json").read_text())
    assert info["task_loop"] == "vectorised (vmap)" and info["update"].startswith("separate parts")
    code, out, err = run_cli(["train", "--resume", "--out", run, "--no-progress", "train.iterations=20"], capsys)
    assert code == 0, err
    assert "trained maml for 20 iterations" in out
    assert [i for i, _ in checkpoints(run)] == [10, 20]
    # --resume may change [train] keys only.
    code, _, err = run_cli(["train", "--resume", "--out", run, "--no-progress", "model.hidden=[4,4]"], capsys)
    assert code == 2 and "own config" in err and len(err.strip().splitlines()) == 1


def test_overwrite_replaces_a_run(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(trained, tmp_path)
    (run / "eval.json").write_text("{}")
    code, _, err = run_cli(["train", "--out", run, "--overwrite", "--no-progress", *TINY, "train.iterations=5"], capsys)
    assert code == 0, err
    assert not (run / "eval.json").exists()
    assert [i for i, _ in checkpoints(run)] == [5]
    assert load_learner(run)[2]["iteration"] == 5


def test_train_with_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ROOT / "configs" / "sinusoid" / "fomaml.toml"
    overrides = [*TINY, "train.iterations=4", "train.compile=false"]
    argv = ["train", "--config", config, "--out", tmp_path / "r", "--no-progress", *overrides]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "trained fomaml for 4 iterations" in out
    cfg = load_learner(tmp_path / "r")[0]
    assert cfg.algorithm.name == "fomaml" and cfg.train.meta_batch == 4 and cfg.task.shots == 10


def test_divergence_exits_1_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--out", tmp_path / "r", "--no-progress", *TINY, "algorithm.inner_lr=1e6"]
    code, out, err = run_cli(argv, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "diverged at iteration 1" in lines[0] and "Traceback" not in err


# ----- the installed console script, end to end ----------------------------------------------------------


def _metagrad_command() -> list[str]:
    script = Path(sys.executable).parent / "metagrad"
    return [str(script)] if script.exists() else [sys.executable, "-m", "metagrad"]


def test_console_script_end_to_end(tmp_path: Path) -> None:
    cmd = _metagrad_command()
    run, js, png = tmp_path / "run", tmp_path / "out" / "eval.json", tmp_path / "eval.png"
    (tmp_path / "out").mkdir()
    trained = subprocess.run(
        [*cmd, "train", "--out", str(run), "--no-progress", *TINY],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "trained maml for 20 iterations" in trained.stdout
    evaluated = subprocess.run(
        [*cmd, "eval", str(run), "--tasks", "20", "--steps", "2", "--shots", "5", "10", "--json", str(js),
         "--plot", str(png)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert "maml on sinusoid, 20 tasks" in evaluated.stdout

    result = json.loads(js.read_text())
    assert {"algorithm", "task", "scoring", "tasks", "results"} <= result.keys()
    assert isinstance(result["algorithm"], str) and result["algorithm"] == "maml"
    assert result["task"] == "sinusoid"
    assert isinstance(result["scoring"], str) and result["scoring"] == "dense"
    assert type(result["tasks"]) is int and result["tasks"] == 20
    assert result["checkpoint"] == "latest" and result["iteration"] == 20  # which weights were scored
    assert isinstance(result["results"], list) and len(result["results"]) == 2
    for entry, shots in zip(result["results"], (5, 10), strict=True):
        assert {"shots", "steps", "mse", "ci95"} <= entry.keys()
        assert type(entry["shots"]) is int and entry["shots"] == shots
        assert entry["steps"] == [0, 1, 2] and all(type(s) is int for s in entry["steps"])
        for key in ("mse", "ci95"):
            assert isinstance(entry[key], list) and len(entry[key]) == 3
            assert all(isinstance(v, float) and v >= 0 for v in entry[key])
        assert all(c > 0 for c in entry["ci95"])
    # The run's own copy also records which checkpoint was evaluated, for `metagrad plot`.
    assert json.loads((run / "eval.json").read_text()) == {**result, "checkpoint": "latest"}

    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_without_shipped_configs_the_parser_still_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install without configs/ (e.g. a wheel built from an old sdist): --help and commands that need no
    preset still run; compare --task says what is missing in one line."""
    from metagrad import presets
    from metagrad.errors import ConfigError

    def missing() -> Path:
        raise ConfigError("metagrad's shipped configs are missing; reinstall metagrad")

    monkeypatch.setattr(presets, "configs_dir", missing)
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "compare" in out
    code, out, _ = run_cli(["compare", "--help"], capsys)
    assert code == 0 and "--task" in out
    code, _, err = run_cli(["compare", "--task", "sinusoid", "--out", tmp_path / "c"], capsys)
    assert code == 2 and err.count("\n") == 1 and "configs are missing" in err
    assert not (tmp_path / "c").exists()


def test_compare_unknown_task_exits_2_naming_the_benchmarks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["compare", "--task", "sinusiod", "--out", tmp_path / "c"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "sinusiod" in err and "omniglot" in err and "sinusoid" in err
    assert not (tmp_path / "c").exists()
