"""Meta-learning algorithms: each file holds one update rule on the shared MetaLearner machinery."""

from metagrad.algorithms.base import LOSSES, MetaLearner
from metagrad.algorithms.baselines import Oracle, Pretrain
from metagrad.algorithms.cavia import CAVIA, ContextNetwork
from metagrad.algorithms.enhanced import MAMLEnhanced
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.maml import MAML, multi_step_weights
from metagrad.algorithms.metasgd import MetaSGD
from metagrad.algorithms.protonet import NotClassificationError, ProtoNet
from metagrad.algorithms.reptile import Reptile

__all__ = [
    "MetaLearner",
    "MAML",
    "MetaSGD",
    "MAMLEnhanced",
    "Reptile",
    "multi_step_weights",
    "LOSSES",
    "Pretrain",
    "Oracle",
    "ProtoNet",
    "NotClassificationError",
    "IMAML",
    "CAVIA",
    "ContextNetwork",
]
