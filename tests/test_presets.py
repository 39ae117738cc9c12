"""Presets are the shipped TOML files: every one loads and validates under every budget; compare and the Omniglot
path work end to end on tiny budgets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from metagrad import presets as presets_module
from metagrad.cli import main
from metagrad.config import load_config
from metagrad.errors import ConfigError
from metagrad.presets import budgets, compare_algorithms, configs_dir, preset, presets, tasks

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot data not found at {OMNIGLOT}")
SHIPPED = [(t, a) for t in tasks() for a in presets(t)]


def test_presets_are_the_files_in_configs() -> None:
    assert configs_dir() == ROOT / "configs"  # a source checkout reads the repository's own folder
    assert {"sinusoid", "omniglot"} <= set(tasks())
    for task in tasks():
        files = presets(task)
        assert set(compare_algorithms(task)) <= set(files), task  # compare runs shipped presets only
        assert files == {p.stem: p for p in (ROOT / "configs" / task).glob("*.toml") if p.stem != "benchmark"}
        assert "paper" in budgets(task) and "default" in budgets(task)


@pytest.mark.parametrize(("task", "algorithm"), SHIPPED, ids=[f"{t}/{a}" for t, a in SHIPPED])
def test_every_shipped_preset_loads_and_validates_under_every_budget(task: str, algorithm: str) -> None:
    path = ROOT / "configs" / task / f"{algorithm}.toml"
    paper = preset(algorithm, "paper", task)
    assert paper == load_config(path)  # the preset is the file, as `metagrad train --config` reads it
    assert paper.task.name in (task, "images")  # a benchmark is its own family, or an image data set's layout
    for budget in budgets(task):
        cfg = preset(algorithm, budget, task)
        assert cfg.algorithm.name == paper.algorithm.name
        assert cfg.task == paper.task or "task" in budgets(task)[budget]  # tiny image benchmarks shrink images
    # A budget changes what it lists and nothing else.
    tiny = budgets(task)["tiny"]
    small = preset(algorithm, "tiny", task).to_dict()
    for section, values in paper.to_dict().items():
        for key, value in values.items():
            assert small[section][key] == tiny.get(section, {}).get(key, value), f"{section}.{key}"


def test_a_broken_shipped_config_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", copy)
    monkeypatch.setattr(presets_module, "configs_dir", lambda: copy)
    maml = copy / "sinusoid" / "maml.toml"
    maml.write_text(maml.read_text().replace("inner_steps = 1", "inner_step = 1"))
    with pytest.raises(ConfigError, match="inner_step.*did you mean 'inner_steps'"):
        preset("maml", "default")
    (copy / "sinusoid" / "benchmark.toml").write_text("[budgets.tiny.train]\niteration = 3\n")
    with pytest.raises(ConfigError, match="unknown key train.iteration"):
        preset("fomaml", "tiny")


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'maml_enhanced'"):
        preset("maml_enhancd")
    with pytest.raises(ConfigError, match="unknown budget"):
        preset("maml", "papr")
    with pytest.raises(ConfigError, match="for omniglot"):
        preset("oracle", "paper", "omniglot")
    with pytest.raises(ConfigError, match="did you mean 'omniglot'"):
        preset("maml", "paper", "omniglott")


def test_compare_writes_report_results_and_figures(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", "--budget", "tiny", "--out", str(out), "--algorithms", "maml", "oracle", "--no-progress",
                 "--workers", "1"])  # fmt: skip
    assert code == 0
    for name in ("report.md", "results.json", "adaptation.png", "fits.png", "compare.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert [r["algorithm"] for r in data["results"]] == ["maml", "oracle"]
    assert "| maml |" in (out / "report.md").read_text()
    # The oracle sees the true amplitude and phase: far better than MAML on the same tasks, even this briefly.
    maml, oracle = (r["results"][0]["mse"][0] for r in data["results"])
    assert oracle < maml
    assert main(["plot", str(out)]) == 0
    assert main(["compare", "--budget", "tiny", "--out", str(out), "--algorithms", "maml", "--no-progress"]) == 2
    assert "already holds a comparison" in capsys.readouterr().err


def test_compare_rejects_unknown_algorithms(tmp_path, capsys) -> None:
    assert main(["compare", "--out", str(tmp_path / "x"), "--algorithms", "mamll"]) == 2
    assert "did you mean 'maml'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@needs_omniglot
def test_omniglot_train_eval_and_lake_runs(tmp_path, capsys) -> None:
    run = tmp_path / "om"
    cfg = ["task.name=omniglot", "model.name=conv4", "model.channels=8", f"task.data={OMNIGLOT}", "train.threads=1",
           "train.iterations=4", "train.meta_batch=2", "train.val_every=2", "train.checkpoint_every=2",
           "train.val_tasks=4", "algorithm.inner_lr=0.4"]  # fmt: skip
    assert main(["train", "--out", str(run), "--no-progress", *cfg]) == 0
    assert (
        main(["eval", str(run), "--tasks", "6", "--steps", "1", "--shots", "1", "--json", str(tmp_path / "e.json")])
        == 0
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metric"] == "accuracy" and result["ways"] == 5
    assert 0.0 <= min(result["results"][0]["accuracy"]) <= max(result["results"][0]["accuracy"]) <= 1.0
    # Lake's runs are 20-way: a 5-way model is refused with a line saying how to fix it.
    capsys.readouterr()
    assert main(["eval", str(run), "--benchmark", "omniglot-runs", "--data", str(OMNIGLOT)]) == 2
    assert "task.ways=20" in capsys.readouterr().err


@needs_omniglot
def test_omniglot_bad_inputs_are_one_line_errors(tmp_path, capsys) -> None:
    base = ["task.name=omniglot", "model.name=conv4", "train.iterations=2"]
    assert main(["train", "--out", str(tmp_path / "a"), *base, f"task.data={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "b"), *base, f"task.data={OMNIGLOT}", "task.shots=15",
                 "task.queries=10"]) == 2  # fmt: skip
    assert "images per Omniglot class" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "c"), "task.name=omniglot"]) == 2  # model must be conv4
    assert "model mlp needs vector inputs; the task gives (1, 28, 28): use conv4" in capsys.readouterr().err


def test_compare_keeps_the_other_results_when_one_run_fails(tmp_path, capsys) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "compare.json").write_text("{}")  # an earlier comparison, replaced with --overwrite
    (out / "maml").write_text("not a run")  # maml's run directory cannot be created: that run alone fails
    argv = ["compare", "--budget", "tiny", "--out", str(out), "--algorithms", "maml", "reptile", "--no-progress"]
    assert main([*argv, "--overwrite"]) == 1
    assert "some runs failed" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert list(results["failures"]) == ["maml"] and "is not a directory" in results["failures"]["maml"]
    assert [r["algorithm"] for r in results["results"]] == ["reptile"]
    assert "Failed runs (not in the table): maml" in (out / "report.md").read_text()
    assert (out / "adaptation.png").is_file()


def test_compare_overrides_change_a_shipped_benchmarks_presets(tmp_path, capsys) -> None:
    """`compare --task T key=value`: the benchmark's presets with the overrides on top; an algorithm.* key goes to
    the algorithms that have it; a key no config has is refused in one line."""
    from metagrad.run import read_run_config

    out = tmp_path / "cmp"
    argv = ["compare", "--task", "sinusoid", "--budget", "tiny", "--out", str(out), "--algorithms", "maml", "reptile",
            "--no-progress", "--workers", "1", "--tasks", "5", "train.iterations=4", "algorithm.anil=true"]
    assert main(argv) == 0, capsys.readouterr().err
    maml, reptile = read_run_config(out / "maml"), read_run_config(out / "reptile")
    assert maml.train.iterations == reptile.train.iterations == 4
    assert maml.algorithm.anil is True and "anil" not in reptile.algorithm.keys
    assert maml.algorithm.inner_lr == preset("maml", "tiny").algorithm.inner_lr  # the rest is the preset
    assert "train.iterations=4 algorithm.anil=true`" in (out / "report.md").read_text()  # the command, whole
    assert json.loads((out / "results.json").read_text())["overrides"] == ["train.iterations=4", "algorithm.anil=true"]
    bad = ["compare", "--task", "sinusoid", "--budget", "tiny", "--out", str(tmp_path / "bad"), "--algorithms",
           "maml", "--no-progress", "task.bogus=1"]
    assert main(bad) == 2
    assert "bogus" in capsys.readouterr().err


def test_compare_can_score_the_best_validation_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--budget", "tiny", "--out", str(out), "--algorithms", "maml", "--no-progress", "--workers",
            "1", "--tasks", "5", "--checkpoint", "best", "train.iterations=6", "train.val_every=2"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["checkpoint"] == "best" and "--checkpoint best" in (out / "report.md").read_text()
    best = json.loads((out / "maml" / "checkpoints" / "best" / "trainer.json").read_text())["iteration"]
    assert data["results"][0]["scored_iteration"] == best in (2, 4, 6)
