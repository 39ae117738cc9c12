"""The shipped sinusoid configurations, by algorithm and budget.

``paper`` is the published protocol (70,000 meta-iterations; ``configs/sinusoid/*.toml`` hold the same
values, checked by a test); ``default`` is the short budget of ``metagrad compare`` (about 3 minutes for all
algorithms on 2 CPU cores); ``tiny`` is for tests and notebooks.
"""

from __future__ import annotations

import math
from typing import Any

from metagrad.config import Config, config_from_dict
from metagrad.errors import ConfigError

__all__ = ["PRESETS", "BUDGETS", "COMPARE_ALGORITHMS", "preset"]

_COMMON: dict[str, Any] = {
    "task": {"name": "sinusoid", "shots": 10, "queries": 10, "amplitude": [0.1, 5.0], "phase": [0.0, math.pi],
             "x_range": [-5.0, 5.0]},
    "model": {"hidden": [40, 40], "activation": "relu"},
    "train": {"iterations": 70000, "meta_batch": 25, "optimizer": "adam", "meta_lr": 0.001, "seed": 0,
              "val_every": 5000, "checkpoint_every": 5000, "compile": True, "threads": 1},
    "eval": {"shots": [5, 10, 20], "steps": 10, "tasks": 600, "scoring": "dense"},
}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "maml": {"algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1}},
    "fomaml": {"algorithm": {"name": "fomaml", "inner_lr": 0.01, "inner_steps": 1}},
    "metasgd": {"algorithm": {"name": "metasgd", "inner_lr": 0.01, "inner_steps": 1}},
    "maml_enhanced": {
        "algorithm": {
            "name": "maml_enhanced",
            "inner_lr": 0.01,
            "inner_steps": 5,
            "msl_epochs": 10,
            "epoch_iterations": 500,
            "first_order_iterations": 0,
        },
        "train": {"lr_schedule": "cosine", "meta_lr_final": 1e-5},
    },  # fmt: skip
    "reptile": {
        "algorithm": {
            "name": "reptile",
            "inner_lr": 0.02,
            "inner_steps": 5,
            "inner_batch": 10,
            "inner_optimizer": "sgd",
        },
        "train": {"optimizer": "sgd", "meta_lr": 1.0, "lr_schedule": "linear", "meta_lr_final": 0.0},
    },
    "pretrain": {"algorithm": {"name": "pretrain", "inner_lr": 0.01}},
    "oracle": {"algorithm": {"name": "oracle"}},
}

BUDGETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "default": {"train": {"iterations": 4000, "compile": False, "val_every": 1000, "checkpoint_every": 1000,
                          "log_every": 50}},
    "tiny": {"train": {"iterations": 60, "compile": False, "val_every": 30, "checkpoint_every": 30, "log_every": 10,
                       "val_tasks": 20}, "eval": {"tasks": 50, "steps": 3}},
}  # fmt: skip

COMPARE_ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd", "maml_enhanced", "pretrain", "oracle")


def preset(algorithm: str, budget: str = "paper") -> Config:
    """The shipped configuration of ``algorithm`` under ``budget``."""
    from metagrad.config import _suggest

    if algorithm not in PRESETS:
        raise ConfigError(
            f"unknown algorithm {algorithm!r}{_suggest(algorithm, PRESETS)}; choose from {', '.join(PRESETS)}"
        )
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}{_suggest(budget, BUDGETS)}; choose from {', '.join(BUDGETS)}")
    cfg = Config()
    for layer in (_COMMON, PRESETS[algorithm], BUDGETS[budget]):
        cfg = config_from_dict(layer, cfg)
    return cfg.validate()
