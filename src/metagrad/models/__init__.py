"""Networks used through ``torch.func.functional_call``."""

from metagrad.models.mlp import ACTIVATIONS, MLP

__all__ = ["MLP", "ACTIVATIONS"]
