"""Bring your own task, model and algorithm: registries, per-component config validation, and the whole tool chain
(train, eval, resume, compare, plot, load_learner) for components defined outside metagrad."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from metagrad.build import build_learner
from metagrad.cli import main
from metagrad.config import Config, config_from_dict, load_config
from metagrad.errors import ConfigError
from metagrad.registry import registered, resolve
from metagrad.run import load_learner

PLUGINS = Path(__file__).resolve().parent / "plugins"
USER = ["task.name=wave2d_plugin:Wave2D", "model.name=wave2d_plugin:ResMLP", "model.width=8", "task.shots=5",
        "task.queries=5", "train.iterations=6", "train.meta_batch=4", "train.val_every=3", "train.checkpoint_every=3",
        "train.log_every=3", "train.val_tasks=4", "train.threads=1", "eval.tasks=6", "eval.steps=2",
        "eval.shots=[5]"]  # fmt: skip


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))  # the user's package is importable, as after `pip install -e`
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS))  # for compare's worker processes


def test_shipped_components_are_registered_like_a_users():
    assert {"sinusoid", "omniglot"} <= set(registered("task"))
    assert {"mlp", "conv4"} <= set(registered("model"))
    assert {"maml", "fomaml", "metasgd", "maml_enhanced", "reptile", "pretrain", "oracle"} <= set(
        registered("algorithm")
    )
    assert resolve("algorithm", "metagrad.algorithms.maml:MAML").name == "maml"


def test_user_components_go_through_train_eval_resume_compare_and_plot(plugins, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *USER]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["task"]["name"] == "wave2d_plugin:Wave2D" and record["config"]["model"]["width"] == 8
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--json", str(out), "--plot", str(tmp_path / "eval.png")]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "wave2d" and len(result["results"][0]["mse"]) == 3
    assert (tmp_path / "eval.png").stat().st_size > 0
    # Resume: kill after the first checkpoint (simulated by training to 3), then continue to 6: bit-identical.
    half = tmp_path / "half"
    assert main(["train", "--out", str(half), "--no-progress", *USER, "train.iterations=3"]) == 0
    assert main(["train", "--out", str(half), "--resume", "--no-progress", "train.iterations=6"]) == 0
    _, full_learner, _ = load_learner(run)
    _, resumed, _ = load_learner(half)
    for k, v in full_learner.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert isinstance(full_learner.model, torch.nn.Module) and type(full_learner.model).__name__ == "ResMLP"
    cmp = tmp_path / "cmp"
    argv = ["compare", "--out", str(cmp), "--no-progress", "--workers", "1", "--algorithms", "maml", "maml_enhanced",
            "--tasks", "6", *USER, "algorithm.inner_steps=2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((cmp / "results.json").read_text())
    assert [r["algorithm"] for r in data["results"]] == ["maml", "maml_enhanced"]
    assert data["task"] == "wave2d_plugin:Wave2D"
    assert main(["plot", str(cmp)]) == 0 and (cmp / "adaptation.png").is_file()
    # A user's algorithm with a user's inner rule, by import path, on the user's task and model.
    own = tmp_path / "own"
    assert main(["train", "--out", str(own), "--no-progress", *USER, "algorithm.name=wave2d_plugin:ClippedMAML",
                 "algorithm.max_norm=0.5"]) == 0  # fmt: skip
    _, learner, _ = load_learner(own)
    assert type(learner).__name__ == "ClippedMAML" and learner.rule.max_norm == 0.5
    assert main(["eval", str(own), "--tasks", "4"]) == 0
    # metagrad adapt: the user's 2-D points in, predictions out, equal to learner.adapt + predict.
    (tmp_path / "s.csv").write_text("x1,x2,y\n0.5,1.0,0.9\n-1.0,2.0,1.5\n2.0,-0.5,-0.2\n")
    import numpy as np

    np.save(tmp_path / "q.npy", np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert main(["adapt", str(run), "--support", str(tmp_path / "s.csv"), "--query", str(tmp_path / "q.npy"),
                 "--steps", "2", "--out", str(tmp_path / "p.csv")]) == 0  # fmt: skip
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "x0,x1,prediction" and len(rows) == 3
    sx = torch.tensor([[0.5, 1.0], [-1.0, 2.0], [2.0, -0.5]])
    adapted = full_learner.adapt(sx, torch.tensor([[0.9], [1.5], [-0.2]]), steps=2)
    expected = full_learner.predict(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), adapted, step=2)
    assert [float(r.split(",")[-1]) for r in rows[1:]] == pytest.approx(expected[:, 0].tolist(), rel=1e-5)
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5\n")
    assert main(["adapt", str(run), "--support", str(tmp_path / "bad.csv"), "--query", str(tmp_path / "q.npy")]) == 2
    assert "different numbers of columns" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("task.name=nowhere_plugin:Wave", "cannot import module 'nowhere_plugin'"),
        ("task.name=wave2d_plugin:Nothing", "has no attribute 'Nothing'"),
        ("task.name=wave2d_plugin:dataclass", "is not a registered task"),
        ("task.name=wav2d", "is not a registered task"),
    ],
)
def test_a_missing_or_unregistered_component_is_one_line_exit_2(plugins, tmp_path, capsys, override, phrase):
    assert main(["train", "--out", str(tmp_path / "r"), "--no-progress", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], err


ALGORITHM_KEYS = {
    "inner_batch": 3, "inner_optimizer": "adam", "persist_inner_state": False, "lslr": True, "curvature": False,
    "per_layer_lr": True, "anil": True, "first_order": True, "multi_step_loss": True, "eval_inner_lr": 0.05,
    "msl_epochs": 3, "rate_parameterization": "raw", "lslr_beyond": "last", "first_order_iterations": 2,
    "epoch_iterations": 3, "inner_steps": 2, "inner_lr": 0.02,
}  # fmt: skip


def _fingerprint(learner) -> str:
    """What a learner was built with: its module tree (rule and its settings) and its training options."""
    attrs = ("inner_steps", "first_order", "multi_step_loss", "msl_epochs", "epoch_iterations",
             "first_order_iterations", "inner_batch", "inner_optimizer", "persist_inner_state", "fast")  # fmt: skip
    return repr((repr(learner), repr(learner.eval_rule), [getattr(learner, a, None) for a in attrs]))


@pytest.mark.parametrize("algorithm", sorted(registered("algorithm")))
def test_every_algorithm_key_is_honoured_or_rejected_naming_the_algorithm(algorithm):
    """A key the algorithm does not have is an error; a key it has changes what is built or, where a switch it
    depends on is off, is an error too (no silent ignoring)."""
    config = resolve("algorithm", algorithm).config
    keys = {f.name for f in dataclasses.fields(config)}
    for key, value in ALGORITHM_KEYS.items():
        if key in keys and getattr(config(), key) == value:  # choose a value that differs from the default
            value = (not value) if isinstance(value, bool) else value + 1 if isinstance(value, int) else value * 1.5
        overrides = [f"algorithm.name={algorithm}", f"algorithm.{key}={json.dumps(value)}"]
        if key not in keys:
            with pytest.raises(ConfigError, match=f"unknown key algorithm.{key} for algorithm '{algorithm}'"):
                load_config(None, overrides)
            continue
        try:
            cfg = load_config(None, overrides)
        except ConfigError as e:  # rejected, saying why: it would be ignored
            assert f"algorithm.{key} applies only with" in str(e)
            continue
        assert getattr(cfg.algorithm, key) == value
        before = _fingerprint(build_learner(load_config(None, overrides[:1])))
        changed = _fingerprint(build_learner(cfg)) != before
        assert changed, f"{algorithm}: algorithm.{key} = {value!r} changed nothing"


def test_maml_enhanced_ablation_builds_maml_plus_lslr():
    learner = build_learner(load_config(None, ["algorithm.name=maml_enhanced", "algorithm.curvature=false"]))
    assert type(learner.rule).__name__ == "LSLR" and not any(k.startswith("curvature") for k in learner.meta_state)


def test_config_objects_reject_typos_and_wrong_types_when_set():
    cfg = Config()
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        cfg.train.iteration = 7
    with pytest.raises(ConfigError, match="train.iterations must be an integer"):
        cfg.train.iterations = "20"
    with pytest.raises(ConfigError, match="algorithm 'maml'"):
        cfg.algorithm.inner_batch = 3
    with pytest.raises(AttributeError):
        cfg.trian = 3
    cfg.algorithm.name = "reptile"
    assert cfg.algorithm.inner_batch == 10 and not hasattr(cfg.algorithm, "first_order")
    back = config_from_dict(cfg.to_dict())
    assert back == cfg


def test_old_run_records_with_keys_that_no_longer_apply_still_load():
    old = Config().to_dict()
    old["algorithm"]["inner_batch"] = 10  # written when every algorithm held every key
    with pytest.raises(ConfigError):
        config_from_dict(old)
    assert config_from_dict(old, strict=False).algorithm.name == "maml"


def test_old_maml_enhanced_records_and_reptile_checkpoints_keep_their_meaning(tmp_path):
    """Records from when every algorithm held every key: maml_enhanced's stored curvature = false and
    multi_step_loss = false were ignored then (the preset had both on), so they are now; Reptile's inner Adam
    moments were saved as extra.reptile.*."""
    from metagrad import MLP, Reptile
    from metagrad.run import load_state

    old = Config().to_dict()
    old["algorithm"] = {**old["algorithm"], "name": "maml_enhanced", "inner_batch": 10, "curvature": False,
                        "multi_step_loss": False, "inner_steps": 3}  # fmt: skip
    cfg = config_from_dict(old, strict=False)
    assert cfg.algorithm.curvature and cfg.algorithm.multi_step_loss and cfg.algorithm.inner_steps == 3
    learner = Reptile(MLP(), inner_optimizer="adam")
    weights = {f"params.{k}": v.detach() + 1 for k, v in learner.params.items()}
    weights |= {f"extra.{learner.legacy_names[k]}": torch.full_like(v, 0.5) for k, v in learner.extra_state.items()}
    load_state(learner, weights, tmp_path)
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in learner.extra_state.values())


def test_review_fixes_configs_pickle_user_rules_and_compare_keys(plugins, tmp_path):
    import pickle

    from metagrad.compare import config_for
    from metagrad.config import raw_config

    cfg = load_config(None, ["algorithm.name=reptile", "algorithm.inner_batch=4"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # spawn workers can receive a Config
    # A user's component is judged by its own rules, not the shipped components' tables for the same key names.
    assert load_config(None, ["model.name=wave2d_plugin:ResMLP", "model.width=3"]).model.width == 3
    # compare --config: what the user set is what each algorithm gets, even where it equals a default.
    raw = raw_config(None, ["algorithm.inner_steps=1", "algorithm.inner_lr=0.01"])
    reptile = config_for("reptile", "default", "sinusoid", raw)
    assert (reptile.algorithm.inner_steps, reptile.algorithm.inner_lr) == (1, 0.01)
    with pytest.raises(ConfigError, match="must look like 'package.module:Class'"):
        load_config(None, ["task.name=:Wave2D"])
