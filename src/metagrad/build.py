"""Objects from a :class:`~metagrad.config.Config`: the task family, the network and the meta-learner."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from metagrad.algorithms import MAML, MAMLEnhanced, MetaLearner, MetaSGD, Oracle, Pretrain, Reptile
from metagrad.config import Config
from metagrad.errors import ConfigError
from metagrad.inner import LSLR, SGD, Chain, Curvature, InnerRule
from metagrad.models import MLP
from metagrad.models.conv4 import Conv4
from metagrad.tasks import OracleSinusoid, Sinusoid, TaskDistribution
from metagrad.tasks.episodes import EpisodeSampler
from metagrad.tasks.omniglot import OmniglotData, augment_rotations, load_omniglot, split_classes

__all__ = ["build_task", "build_model", "build_learner", "resolve_device", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available on this machine (no CUDA GPU); use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a valid device; use auto, cpu or cuda") from None


SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=4)
def _omniglot(root: str, size: int, rotations: bool) -> OmniglotData:
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(
            f"task.data = {root!r} does not exist; point it at an Omniglot folder or its zip files "
            "(e.g. task.data=../shared/data/omniglot)"
        )
    try:
        data = load_omniglot(path, size=size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"task.data = {root!r} could not be read as Omniglot: {e}") from None
    return augment_rotations(*data) if rotations else data


def build_task(cfg: Config, split: str = "test") -> TaskDistribution:
    """The task family of ``cfg``; for classification, the episodes of one class split (train/val/test; by
    default the held-out test classes, which is what every evaluation must use).

    The class split is drawn from a fixed seed (0), independent of the training seed, so every run holds out
    the same classes."""
    t = cfg.task
    if t.name == "sinusoid":
        family = OracleSinusoid if cfg.algorithm.name == "oracle" else Sinusoid
        return family(tuple(t.amplitude), tuple(t.phase), tuple(t.x_range), t.noise)
    data = _omniglot(t.data, t.image_size, t.rotations)
    if t.split == "none":
        classes = list(range(len(data.class_names)))
    else:
        parts = dict(zip(SPLITS, split_classes(data.class_names, t.split, (0.7, 0.1, 0.2), seed=0), strict=True))
        classes = parts[split]
    sampler = EpisodeSampler(data.images, data.labels, t.ways, classes, name="omniglot")
    if t.shots + t.queries > sampler.min_images_per_class:
        raise ConfigError(
            f"task.shots + task.queries = {t.shots + t.queries} exceeds the {sampler.min_images_per_class} "
            "images per Omniglot class"
        )
    if t.ways > sampler.num_classes:
        raise ConfigError(f"task.ways = {t.ways} exceeds the {sampler.num_classes} classes of the {split} split")
    return sampler


def build_model(cfg: Config) -> torch.nn.Module:
    # The initialisation is drawn from a generator seeded by the run's seed, not the global RNG's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        if cfg.model.name == "conv4":
            m = cfg.model
            return Conv4(1, cfg.task.ways, m.channels, cfg.task.image_size, m.bn, cfg.algorithm.inner_steps)
        inputs = OracleSinusoid.input_features if cfg.algorithm.name == "oracle" else Sinusoid.input_features
        return MLP(inputs, tuple(cfg.model.hidden), 1, cfg.model.activation)


def _maml_rule(cfg: Config) -> InnerRule:
    a = cfg.algorithm
    rate: InnerRule = (
        LSLR(a.inner_lr, a.inner_steps, a.per_layer_lr, a.rate_parameterization, a.lslr_beyond)
        if a.lslr
        else SGD(a.inner_lr)
    )
    return Chain(Curvature(), rate) if a.curvature else rate


def build_learner(cfg: Config, model: torch.nn.Module | None = None) -> MetaLearner:
    """The meta-learner a config describes (on the CPU, in float32 unless moved)."""
    a = cfg.algorithm
    model = model if model is not None else build_model(cfg)
    loss = "cross_entropy" if cfg.task.name == "omniglot" else "mse"
    common = {"vectorize": cfg.train.vectorize, "inner_steps": a.inner_steps, "loss": loss}
    if a.anil:
        # ANIL adapts the network's last layer: Conv-4's head, the MLP's last Linear.
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        common["adapt_only"] = getattr(model, "head", None) or linear[-1]
    learned = a.name in ("metasgd", "maml_enhanced") or a.lslr or a.curvature
    if a.eval_inner_lr is not None and learned:
        raise ConfigError(
            "algorithm.eval_inner_lr cannot be set for learned inner rules: they adapt with what they learned"
        )
    eval_rule = SGD(a.eval_inner_lr) if a.eval_inner_lr is not None else None
    plus = {
        "multi_step_loss": a.multi_step_loss,
        "msl_epochs": a.msl_epochs,
        "epoch_iterations": a.epoch_iterations,
        "first_order_iterations": a.first_order_iterations,
        "first_order": a.first_order,
    }
    if a.name == "reptile":
        learner: MetaLearner = Reptile(
            model,
            inner_lr=a.inner_lr,
            inner_batch=a.inner_batch,
            inner_optimizer=a.inner_optimizer,
            persist_inner_state=a.persist_inner_state,
            eval_rule=eval_rule,
            **common,
        )
    elif a.name in ("pretrain", "oracle"):
        family = Pretrain if a.name == "pretrain" else Oracle
        learner = family(model, inner_lr=a.inner_lr, eval_rule=eval_rule, vectorize=cfg.train.vectorize, loss=loss)
    elif a.name == "metasgd":
        learner = MetaSGD(model, inner_lr=a.inner_lr, parameterization=a.rate_parameterization, **plus, **common)
    elif a.name == "maml_enhanced":
        # The preset: Meta-Curvature + LSLR + multi-step loss. Ablations: name = "maml" with lslr/curvature.
        learner = MAMLEnhanced(
            model,
            inner_lr=a.inner_lr,
            per_layer=a.per_layer_lr,
            parameterization=a.rate_parameterization,
            beyond=a.lslr_beyond,
            **{**plus, "multi_step_loss": True},
            **common,
        )
    elif a.name in ("maml", "fomaml"):
        plus["first_order"] = a.first_order or a.name == "fomaml"
        learner = MAML(model, _maml_rule(cfg), eval_rule=eval_rule, **plus, **common)
    else:  # pragma: no cover - validated by Config
        raise ConfigError(f"unknown algorithm {a.name!r}")
    return learner
