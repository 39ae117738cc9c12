"""Shared fixtures for the metagrad test suite."""

from __future__ import annotations

import os

import pytest
import torch

# The suite runs on pytest-xdist's workers (pyproject's addopts; `-n 0` runs it in one process). Each worker gets
# its share of the cores: PyTorch's OpenMP teams in two workers, each as wide as the machine, oversubscribed the
# cores and made the suite slower than one process. Subprocesses (the CLI, torchrun) inherit the same width.
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    from metagrad.task_threads import usable_cores

    _width = max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_width)
    torch.set_num_threads(_width)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than about 20 s (run by default)")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Every cache (decoded images, Omniglot) goes to one folder of this session, never ~/.cache/metagrad: the
    tests leave no machine state, and the shared Omniglot data is only read from where it lies (a test that sets
    METAGRAD_CACHE itself, with monkeypatch, still gets its own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METAGRAD_CACHE", str(tmp_path_factory.mktemp("metagrad-cache")))
        yield


@pytest.fixture
def float64():
    """Run the test with float64 as the default dtype, restoring the previous default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _default_dtype_unchanged():
    """Fail any test (or library call) that leaks a change of the global default dtype."""
    before = torch.get_default_dtype()
    yield
    after = torch.get_default_dtype()
    torch.set_default_dtype(before)
    assert after == before, f"default dtype leaked: {before} -> {after}"


@pytest.fixture(autouse=True)
def _restore_threads():
    """Training with train.threads=N calls torch.set_num_threads; give the next test the original count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
