"""The shipped configurations, by task, algorithm and budget.

``paper`` is the published protocol (sinusoid: 70,000 meta-iterations; Omniglot: the MAML paper's 5-way
settings; ``configs/<task>/*.toml`` hold the same values, checked by a test); ``default`` is the short budget
of ``metagrad compare`` (sinusoid: about 3 minutes for all algorithms on 2 CPU cores); ``cpu`` is a few
minutes of Omniglot on a CPU; ``tiny`` is for tests and notebooks.
"""

from __future__ import annotations

import math
from typing import Any

from metagrad.config import Config, config_from_dict
from metagrad.errors import ConfigError

__all__ = [
    "PRESETS",
    "BUDGETS",
    "COMPARE_ALGORITHMS",
    "OMNIGLOT_PRESETS",
    "OMNIGLOT_COMPARE_ALGORITHMS",
    "TASKS",
    "preset",
]

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

# Few-shot classification: the MAML paper's 5-way Omniglot settings (Finn et al. 2017, section 5.2): inner lr
# 0.4, one inner step, meta-batch 32, Adam 1e-3, 60,000 iterations. Queries are 5 per class.
_OMNIGLOT: dict[str, Any] = {
    "task": {"name": "omniglot", "ways": 5, "shots": 1, "queries": 5, "data": "../shared/data/omniglot",
             "split": "character", "rotations": True, "image_size": 28},
    "model": {"name": "conv4", "channels": 64},
    "train": {"iterations": 60000, "meta_batch": 32, "optimizer": "adam", "meta_lr": 0.001, "seed": 0,
              "val_every": 1000, "checkpoint_every": 1000, "val_tasks": 200, "compile": False, "threads": 0},
    "eval": {"shots": [1, 5], "steps": 10, "tasks": 600, "scoring": "dense"},
}  # fmt: skip

OMNIGLOT_PRESETS: dict[str, dict[str, Any]] = {
    "maml": {"algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1}},
    "fomaml": {"algorithm": {"name": "fomaml", "inner_lr": 0.4, "inner_steps": 1}},
    "metasgd": {"algorithm": {"name": "metasgd", "inner_lr": 0.4, "inner_steps": 1}},
    "maml_enhanced": {
        "algorithm": {"name": "maml_enhanced", "inner_lr": 0.1, "inner_steps": 5, "msl_epochs": 10,
                      "epoch_iterations": 500},
        "train": {"lr_schedule": "cosine", "meta_lr_final": 1e-5},
    },
    "reptile": {
        "algorithm": {"name": "reptile", "inner_lr": 0.1, "inner_steps": 5, "inner_batch": 10,
                      "inner_optimizer": "sgd"},
        "train": {"optimizer": "sgd", "meta_lr": 1.0, "lr_schedule": "linear", "meta_lr_final": 0.0, "meta_batch": 5},
    },
}  # fmt: skip
OMNIGLOT_BUDGETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {"model": {"channels": 32},
            "train": {"iterations": 400, "meta_batch": 8, "val_every": 200, "checkpoint_every": 200, "val_tasks": 50,
                      "log_every": 20, "threads": 1},
            "eval": {"tasks": 300, "steps": 5}},
    "tiny": {"model": {"channels": 8},
             "train": {"iterations": 6, "meta_batch": 2, "val_every": 3, "checkpoint_every": 3, "val_tasks": 4,
                       "log_every": 3, "threads": 1},
             "eval": {"tasks": 6, "steps": 2, "shots": [1]}},
}  # fmt: skip
OMNIGLOT_BUDGETS["default"] = OMNIGLOT_BUDGETS["cpu"]
OMNIGLOT_COMPARE_ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd", "maml_enhanced")
TASKS = ("sinusoid", "omniglot")


def preset(algorithm: str, budget: str = "paper", task: str = "sinusoid") -> Config:
    """The shipped configuration of ``algorithm`` for ``task`` under ``budget``."""
    from metagrad.config import _suggest

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}{_suggest(task, TASKS)}; choose from {', '.join(TASKS)}")
    sinusoid = task == "sinusoid"
    common = _COMMON if sinusoid else _OMNIGLOT
    presets = PRESETS if sinusoid else OMNIGLOT_PRESETS
    budgets = BUDGETS if sinusoid else OMNIGLOT_BUDGETS
    if algorithm not in presets:
        raise ConfigError(
            f"unknown algorithm {algorithm!r} for {task}{_suggest(algorithm, presets)}; "
            f"choose from {', '.join(presets)}"
        )
    if budget not in budgets:
        raise ConfigError(f"unknown budget {budget!r}{_suggest(budget, budgets)}; choose from {', '.join(budgets)}")
    cfg = Config()
    for layer in (common, presets[algorithm], budgets[budget]):
        cfg = config_from_dict(layer, cfg)
    return cfg.validate()
