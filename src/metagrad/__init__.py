"""metagrad: vectorised gradient-based meta-learning on PyTorch with torch.func."""

__version__ = "0.1.0"  # first: metagrad.run reads it while the package is being imported

from metagrad.algorithms import (
    CAVIA,
    IMAML,
    MAML,
    ContextNetwork,
    MAMLEnhanced,
    MetaLearner,
    MetaSGD,
    ProtoNet,
    Reptile,
)
from metagrad.callbacks import Callback, TensorBoardLogger
from metagrad.errors import (
    CheckpointError,
    CompileError,
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
from metagrad.models import MLP, Conv4, Conv4MiniImageNet, ResNet12
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
    "IMAML",
    "CAVIA",
    "ContextNetwork",
    "ProtoNet",
    "InnerRule",
    "Chain",
    "SGD",
    "LSLR",
    "MetaSGDRule",
    "Curvature",
    "MLP",
    "Conv4",
    "Conv4MiniImageNet",
    "ResNet12",
    "register_task",
    "register_model",
    "register_algorithm",
    "TaskSpec",
    "Sinusoid",
    "TaskBatch",
    "TaskDistribution",
    "MetagradError",
    "CompileError",
    "ConfigError",
    "RunError",
    "CheckpointError",
    "DivergenceError",
    "DataError",
    "ModelError",
    "MissingDependencyError",
    "__version__",
]
