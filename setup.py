"""Ships configs/ (the shipped presets, read by metagrad.presets) inside the package as metagrad/configs."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "metagrad" / "configs"
        source = HERE / "configs"  # a git checkout, or an sdist (MANIFEST.in grafts configs/)
        if not source.is_dir():  # a wheel without them would fail at every preset: refuse to build it
            raise SystemExit(f"metagrad: {source} is missing; build from a git checkout or an sdist that has configs/")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.py*", ".*"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
