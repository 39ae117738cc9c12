"""Inner-loop update rules, composable with :class:`Chain`."""

from metagrad.inner.adam import Adam
from metagrad.inner.base import Chain, InnerRule, Params
from metagrad.inner.curvature import Curvature
from metagrad.inner.lslr import LSLR
from metagrad.inner.metasgd import MetaSGD
from metagrad.inner.sgd import SGD

__all__ = ["InnerRule", "Chain", "Params", "SGD", "Adam", "LSLR", "MetaSGD", "Curvature"]
