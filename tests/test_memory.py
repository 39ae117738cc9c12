"""Memory does not grow across many iterations of one configuration (no graph or tensor kept alive)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from metagrad.config import load_config
from metagrad.train import Trainer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("algorithm", ["maml", "maml_enhanced", "reptile"])
def test_memory_is_flat_across_iterations(tmp_path, algorithm: str) -> None:
    cfg = load_config(None, [f"algorithm.name={algorithm}", "algorithm.inner_steps=3", "train.iterations=100000",
                             "model.hidden=[32, 32]", "train.meta_batch=10", "train.threads=1"])  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    for _ in range(60):  # warm-up: allocator pools, optimizer state, lazy initialisation
        trainer.step()
    before = _rss_mib()
    for _ in range(400):
        trainer.step()
    growth = _rss_mib() - before
    # Keeping one meta-step's graph alive per iteration would cost far more than this over 400 iterations.
    assert growth < 8.0, f"RSS grew by {growth:.1f} MiB over 400 iterations"


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_still_does_not_compose_with_torch_func(reentrant: bool) -> None:
    """docs/scaling.md says activation checkpointing is not offered because neither form of
    torch.utils.checkpoint runs under torch.func.grad (and vmap). If this test fails, PyTorch has learned it:
    offer checkpointing of the inner loop and measure what it saves (issue 6)."""
    from torch.func import grad, vmap
    from torch.utils.checkpoint import checkpoint

    def loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda w: torch.tanh(x * w).sum(), w, use_reentrant=reentrant)

    with pytest.raises(RuntimeError, match="saved tensor hooks|setup_context"):
        vmap(grad(loss), in_dims=(None, 0))(torch.tensor(1.0), torch.ones(2, 3))
