"""Networks used through ``torch.func.functional_call``."""

from metagrad.models.conv4 import Conv4, Conv4MiniImageNet
from metagrad.models.mlp import ACTIVATIONS, MLP
from metagrad.models.resnet12 import ResNet12

__all__ = ["MLP", "Conv4", "Conv4MiniImageNet", "ResNet12", "ACTIVATIONS"]
