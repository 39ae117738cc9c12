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


FAULTS = r"""
import resource, torch
from metagrad.allocator import keep_freed_memory

def faults(n):  # page faults of n allocations of 64 MiB, each freed before the next (after one more to warm up)
    torch.ones(2**24)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(2**24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(6), keep_freed_memory(), faults(6))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_kept_memory_is_reused_without_page_faults() -> None:
    """glibc maps a 64 MiB block afresh at every allocation (16,384 page faults each, zeroed by the kernel);
    after keep_freed_memory() the freed block is reused."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout.split()
    before, applied, after = int(out[0]), out[1], int(out[2])
    assert applied == "True"
    assert before > 6 * 16_000, before  # glibc's default: the block is mapped and faulted in again every time
    # (A small block that something else allocates in the freed one may cost one more fault-in, once.)
    assert after <= 16_384 + 300, after


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_keeps_freed_memory_on_the_cpu_as_configured(tmp_path, monkeypatch, keep: bool) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(sys.modules["metagrad.train"], "keep_freed_memory", lambda: calls.append(True) or True)
    Trainer(load_config(None, [f"train.keep_freed_memory={str(keep).lower()}", "train.threads=1"]), tmp_path)
    assert calls == ([True] if keep else [])
