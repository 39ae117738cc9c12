"""metagrad: vectorised gradient-based meta-learning on PyTorch with torch.func."""

from metagrad.algorithms import MAML, MAMLEnhanced, MetaLearner, MetaSGD, Reptile
from metagrad.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    MetagradError,
    ModelError,
    RunError,
)
from metagrad.inner import LSLR, SGD, Chain, Curvature, InnerRule
from metagrad.inner import MetaSGD as MetaSGDRule
from metagrad.models import MLP
from metagrad.registry import TaskSpec, register_algorithm, register_model, register_task
from metagrad.tasks import Sinusoid, TaskBatch, TaskDistribution

__version__ = "0.1.0"

__all__ = [
    "MetaLearner",
    "MAML",
    "MetaSGD",
    "MAMLEnhanced",
    "Reptile",
    "InnerRule",
    "Chain",
    "SGD",
    "LSLR",
    "MetaSGDRule",
    "Curvature",
    "MLP",
    "register_task",
    "register_model",
    "register_algorithm",
    "TaskSpec",
    "Sinusoid",
    "TaskBatch",
    "TaskDistribution",
    "MetagradError",
    "ConfigError",
    "RunError",
    "CheckpointError",
    "DivergenceError",
    "DataError",
    "ModelError",
    "__version__",
]
