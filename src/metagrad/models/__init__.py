"""Networks used through ``torch.func.functional_call``."""

from metagrad.models.conv4 import Conv4
from metagrad.models.mlp import ACTIVATIONS, MLP

__all__ = ["MLP", "Conv4", "ACTIVATIONS"]
