"""metagrad: vectorised gradient-based meta-learning on PyTorch with torch.func."""

__version__ = "0.1.0"  # first: metagrad.run reads it while the package is being imported

from metagrad.algorithms import MAML, MAMLEnhanced, MetaLearner, MetaSGD, Reptile
from metagrad.callbacks import Callback, TensorBoardLogger
from metagrad.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    MetagradError,
    MissingDependencyError,
    ModelError,
    RunError,
)
from metagrad.inner import LSLR, SGD, Chain, Curvature, InnerRule
from metagrad.inner import MetaSGD as MetaSGDRule
from metagrad.models import MLP
from metagrad.registry import TaskSpec, register_algorithm, register_model, register_task
from metagrad.tasks import Sinusoid, TaskBatch, TaskDistribution
from metagrad.train import Trainer, TrainResult, train

__all__ = [
    "MetaLearner",
    "Trainer",
    "TrainResult",
    "train",
    "Callback",
    "TensorBoardLogger",
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
    "MissingDependencyError",
    "__version__",
]
