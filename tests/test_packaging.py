"""The sdist carries configs/ (MANIFEST.in), so a wheel built from it ships the presets (setup.py copies them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_carries_the_shipped_configs(tmp_path: Path) -> None:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in [*files, "MANIFEST.in", "setup.py", "pyproject.toml"]:  # the working tree's, committed or not
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "--dist-dir", str(tmp_path / "dist")],
        cwd=src, check=True, capture_output=True,
    )  # fmt: skip
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.toml")}
    assert shipped and shipped <= names, sorted(shipped - names)
