"""Configuration: defaults, the shipped TOML files, strict keys and types, validation, overrides, round trip."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from metagrad.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_toml,
    load_config,
)
from metagrad.errors import ConfigError, MetagradError
from metagrad.registry import registered

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "sinusoid"


# ----- defaults and shipped files ------------------------------------------------------------------------


def test_defaults_validate_and_follow_the_maml_paper() -> None:
    cfg = Config().validate()
    assert cfg.algorithm.name == "maml"
    assert (cfg.task.shots, cfg.algorithm.inner_steps, cfg.algorithm.inner_lr) == (10, 1, 0.01)
    assert (cfg.train.meta_batch, cfg.train.meta_lr, cfg.train.iterations) == (25, 1e-3, 70000)
    assert load_config() == Config()


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, MetagradError)
    with pytest.raises(ValueError):
        load_config(overrides=["train.iterations=0"])


@pytest.mark.parametrize(("name", "algorithm"), [("maml.toml", "maml"), ("fomaml.toml", "fomaml")])
def test_shipped_configs_give_the_maml_paper_protocol(name: str, algorithm: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.algorithm.name == algorithm
    assert cfg.task.name == "sinusoid"
    assert cfg.task.shots == 10
    assert cfg.algorithm.inner_steps == 1
    assert cfg.algorithm.inner_lr == 0.01
    assert cfg.train.meta_batch == 25
    assert cfg.train.meta_lr == 1e-3
    assert cfg.train.optimizer == "adam"
    assert cfg.train.iterations == 70000
    assert cfg.model.hidden == [40, 40]
    assert cfg.task.amplitude == [0.1, 5.0]
    assert cfg.task.phase == pytest.approx([0.0, math.pi])
    assert cfg.task.x_range == [-5.0, 5.0]


def test_overrides_apply_after_the_file() -> None:
    cfg = load_config(CONFIGS / "maml.toml", ["train.iterations=12", "algorithm.name=fomaml"])
    assert cfg.train.iterations == 12
    assert cfg.algorithm.name == "fomaml"
    assert cfg.train.meta_batch == 25  # from the file, untouched


# ----- unknown names -------------------------------------------------------------------------------------


def test_unknown_section_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"\[trian\].*did you mean 'train'"):
        config_from_dict({"trian": {"iterations": 5}})


def test_unknown_key_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"train\.iteratons.*did you mean 'iterations'"):
        config_from_dict({"train": {"iteratons": 5}})


def test_unknown_key_in_a_toml_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\nhiden = [8, 8]\n")
    with pytest.raises(ConfigError, match=r"model\.hiden.*did you mean 'hidden'"):
        load_config(path)


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.zzzzzz$"):
        config_from_dict({"train": {"zzzzzz": 1}})


def test_section_that_is_not_a_table_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        config_from_dict({"train": 5})


# ----- types ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "phrase"),
    [
        ("train", "iterations", "100", "must be an integer"),  # string for int
        ("train", "iterations", 100.0, "must be an integer"),  # float for int
        ("train", "iterations", True, "must be an integer"),  # bool for int
        ("algorithm", "first_order", 1, "must be true or false"),  # int for bool
        ("train", "compile", "yes", "must be true or false"),
        ("train", "meta_lr", "0.1", "must be a number"),
        ("train", "meta_lr", False, "must be a number"),
        ("algorithm", "name", 3, "must be a string"),
        ("model", "hidden", 40, "must be a list"),
        ("model", "hidden", [40, 4.5], "must be an integer"),
        ("eval", "shots", ["5"], "must be an integer"),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(section: str, key: str, value: object, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase) as info:
        config_from_dict({section: {key: value}})
    assert f"{section}.{key}" in str(info.value)


def test_int_for_float_is_accepted_as_float() -> None:
    cfg = config_from_dict({"train": {"meta_lr": 1}, "task": {"phase": [0, 3]}})
    assert cfg.train.meta_lr == 1.0 and isinstance(cfg.train.meta_lr, float)
    assert cfg.task.phase == [0.0, 3.0] and all(isinstance(v, float) for v in cfg.task.phase)


def test_optional_float_accepts_a_number() -> None:
    cfg = config_from_dict({"train": {"grad_clip": 2}, "algorithm": {"eval_inner_lr": 0.05}})
    assert cfg.train.grad_clip == 2.0
    assert cfg.algorithm.eval_inner_lr == 0.05


# ----- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("train.meta_lr=-0.001", "train.meta_lr must be a finite number >= 0"),
        ("train.meta_lr=nan", "train.meta_lr must be a finite number >= 0"),
        ("train.meta_lr=inf", "train.meta_lr must be a finite number >= 0"),
        ("algorithm.inner_lr=-1", "algorithm.inner_lr must be a finite number >= 0"),
        ("algorithm.inner_lr=nan", "algorithm.inner_lr must be a finite number >= 0"),
        ("train.grad_clip=-1.0", "train.grad_clip must be a finite number >= 0"),
        ("task.noise=-0.1", "task.noise must be a finite number >= 0"),
        ("task.shots=0", "task.shots must be positive"),
        ("task.queries=0", "task.queries must be positive"),
        ("eval.steps=0", "eval.steps must be positive"),
        ("eval.tasks=0", "eval.tasks must be positive"),
        ("train.meta_batch=0", "train.meta_batch must be positive"),
        ("train.iterations=0", "train.iterations must be positive"),
        ("train.iterations=-5", "train.iterations must be positive"),
        ("train.keep_last=0", "train.keep_last must be positive"),
        ("algorithm.inner_steps=-1", "algorithm.inner_steps must be >= 0"),
        ("task.amplitude=[5.0, 0.1]", "task.amplitude must be [low, high] with low < high"),
        ("task.x_range=[1.0, 1.0]", "task.x_range must be [low, high] with low < high"),
        ("task.phase=[0.0, 1.0, 2.0]", "task.phase must be [low, high]"),
        ("task.amplitude=[0.1, inf]", "task.amplitude must be [low, high]"),
        ("model.hidden=[]", "model.hidden must be a non-empty list"),
        ("model.hidden=[8, 0]", "model.hidden must be a non-empty list of positive"),
        ("eval.shots=[5, 0]", "eval.shots must be a non-empty list of positive"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=1000000000", "train.seed"),
        ("model.activation=sigmoid", "model.activation"),
        ("train.optimizer=adamw", "did you mean 'adam'"),
        ("train.lr_schedule=cosin", "did you mean 'cosine'"),
        ("eval.scoring=papr", "did you mean 'paper'"),
    ],
)
def test_invalid_values_are_rejected(override: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        load_config(overrides=[override])


@pytest.mark.parametrize(("name", "suggestion"), [("mamll", "maml"), ("reptil", "reptile"), ("fomaml_", "fomaml")])
def test_unknown_algorithm_is_rejected_with_a_suggestion(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"algorithm.name = '{name}' is not a registered algorithm") as info:
        load_config(overrides=[f"algorithm.name={name}"])
    assert f"did you mean '{suggestion}'" in str(info.value)
    for known in registered("algorithm"):
        assert known in str(info.value)


@pytest.mark.parametrize("name", ["reptile", "maml_enhanced"])
def test_algorithms_that_need_inner_steps_reject_zero(name: str) -> None:
    with pytest.raises(ConfigError, match="inner_steps must be positive"):
        load_config(overrides=[f"algorithm.name={name}", "algorithm.inner_steps=0"])


def test_learned_rates_need_a_positive_inner_lr() -> None:
    with pytest.raises(ConfigError, match="inner_lr must be > 0"):
        load_config(overrides=["algorithm.name=metasgd", "algorithm.inner_lr=0"])


def test_maml_accepts_zero_inner_steps() -> None:
    assert load_config(overrides=["algorithm.inner_steps=0"]).algorithm.inner_steps == 0


# ----- files ---------------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_invalid_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train\niterations = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_config(path)
    assert "bad.toml" in str(info.value)


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[algorithm]\nname = "reptile"\ninner_steps = 5\n[train]\nmeta_lr = 0.5\n')
    cfg = load_config(path)
    assert (cfg.algorithm.name, cfg.algorithm.inner_steps, cfg.train.meta_lr) == ("reptile", 5, 0.5)
    assert cfg.model == Config().model


# ----- overrides -----------------------------------------------------------------------------------------


def test_overrides_parse_every_value_kind() -> None:
    cfg = apply_overrides(
        Config(),
        [
            "train.iterations=123",  # int
            "train.meta_lr=2.5e-4",  # float
            "algorithm.inner_lr=1",  # int for a float
            "algorithm.lslr=true",  # bool
            "train.compile=false",
            "model.hidden=[16, 8, 4]",  # list of ints
            "task.amplitude=[1, 2.5]",  # list of numbers
            "algorithm.name=fomaml",  # bare string
            'model.activation="tanh"',  # quoted string
            " train.seed = 7 ",  # surrounding spaces
        ],
    )
    assert cfg.train.iterations == 123 and isinstance(cfg.train.iterations, int)
    assert cfg.train.meta_lr == 2.5e-4
    assert cfg.algorithm.inner_lr == 1.0 and isinstance(cfg.algorithm.inner_lr, float)
    assert cfg.algorithm.lslr is True
    assert cfg.train.compile is False
    assert cfg.model.hidden == [16, 8, 4]
    assert cfg.task.amplitude == [1.0, 2.5]
    assert cfg.algorithm.name == "fomaml" and cfg.algorithm.inner_lr == 1.0  # a switch keeps what was set
    assert cfg.model.activation == "tanh"
    assert cfg.train.seed == 7


def test_later_override_wins() -> None:
    cfg = apply_overrides(Config(), ["train.iterations=5", "train.iterations=6"])
    assert cfg.train.iterations == 6


@pytest.mark.parametrize("bad", ["iterations=5", "train.iterations", "train=5", ""])
def test_malformed_override_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Config(), [bad])


def test_override_with_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError, match=r"train\.meta_rl.*did you mean 'meta_lr'"):
        load_config(overrides=["train.meta_rl=0.1"])


def test_override_with_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.iterations must be an integer"):
        load_config(overrides=["train.iterations=1.5"])
    with pytest.raises(ConfigError, match=r"train\.iterations must be an integer"):
        load_config(overrides=["train.iterations=many"])
    with pytest.raises(ConfigError, match=r"algorithm\.first_order must be true or false"):
        load_config(overrides=["algorithm.first_order=1"])


def test_overrides_do_not_mutate_the_defaults() -> None:
    load_config(overrides=["model.hidden=[3]", "train.iterations=9"])
    assert Config().model.hidden == [40, 40]
    assert Config().train.iterations == 70000


# ----- TOML round trip -----------------------------------------------------------------------------------


def _roundtrip(cfg: Config) -> Config:
    text = config_to_toml(cfg)
    return config_from_dict(tomllib.loads(text)).validate()


def test_config_to_toml_round_trips_the_defaults() -> None:
    assert _roundtrip(Config()) == Config()


def test_config_to_toml_round_trips_every_changed_field() -> None:
    cfg = load_config(
        CONFIGS / "maml.toml",
        [
            "algorithm.name=reptile",
            "algorithm.inner_steps=3",
            "algorithm.eval_inner_lr=0.02",
            "algorithm.inner_batch=4",
            "train.grad_clip=0.5",
            "train.meta_lr=1.25e-5",
            "train.meta_state_lr=3e-17",
            "train.meta_lr_final=0.0",
            "task.noise=0.3",
            "task.x_range=[-2.5, 7.0]",
            "model.hidden=[7, 9, 11]",
            "model.activation=gelu",
            "eval.shots=[1, 2, 3]",
            "eval.scoring=paper",
            "train.dtype=float64",
        ],
    )
    back = _roundtrip(cfg)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert back.task.phase[1] == math.pi  # full float precision kept


def test_config_to_toml_leaves_none_out() -> None:
    text = config_to_toml(Config())
    assert "eval_inner_lr" not in text and "grad_clip" not in text
    data = tomllib.loads(text)
    assert set(data) == {"task", "model", "algorithm", "train", "eval"}


def test_config_to_toml_file_loads_with_load_config(tmp_path: Path) -> None:
    cfg = load_config(overrides=["train.iterations=77", "model.hidden=[8, 8]"])
    path = tmp_path / "round.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg
