"""The tutorial notebook runs top to bottom (on a tiny budget) and is committed with its outputs stripped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sinusoid.ipynb"
KERNEL = "metagrad-test-python"


def _read() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_committed_without_outputs() -> None:
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} of {NOTEBOOK.name} hold outputs or execution counts: strip them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata


@pytest.mark.slow
def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel spec for *this* interpreter (the one with metagrad installed), whatever `python3` points to.
    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL, overrides={"display_name": KERNEL})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel inherits the environment: a tiny budget, one thread, no GPU.
    monkeypatch.setenv("METAGRAD_NB_ITERATIONS", "30")
    monkeypatch.setenv("METAGRAD_NB_TASKS", "20")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets ipykernel's debugger warning

    nb = _read()
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=600, startup_timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell and the traceback, if any cell fails
    seconds = time.perf_counter() - start
    print(f"notebook executed in {seconds:.1f} s with {sys.executable}")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [
        c.id for c in nb.cells if c.cell_type == "code" and any("image/png" in o.get("data", {}) for o in c.outputs)
    ]
    # Every figure cell shows its figure inline (importing metagrad.plots must not leave them on a file backend).
    plotting = [c.id for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
    assert plotting and images == plotting, f"cells with figures {images}, cells that draw {plotting}"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "maml_enhanced on sinusoid, 20 tasks" in text  # the evaluation tables ran on the tiny budget
    assert "30 iterations" in text
