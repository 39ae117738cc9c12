"""Memory does not grow across many iterations of one configuration (no graph or tensor kept alive)."""

from __future__ import annotations

import os
import sys

import pytest

from metagrad.config import load_config
from metagrad.train import _Trainer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("algorithm", ["maml", "maml_enhanced", "reptile"])
def test_memory_is_flat_across_iterations(tmp_path, algorithm: str) -> None:
    cfg = load_config(None, [f"algorithm.name={algorithm}", "algorithm.inner_steps=3", "train.iterations=100000",
                             "model.hidden=[32, 32]", "train.meta_batch=10", "train.threads=1"])  # fmt: skip
    trainer = _Trainer(cfg, tmp_path, progress=False, callback=None)
    for _ in range(60):  # warm-up: allocator pools, optimizer state, lazy initialisation
        trainer.step()
    before = _rss_mib()
    for _ in range(400):
        trainer.step()
    growth = _rss_mib() - before
    # Keeping one meta-step's graph alive per iteration would cost far more than this over 400 iterations.
    assert growth < 8.0, f"RSS grew by {growth:.1f} MiB over 400 iterations"
