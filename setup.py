"""Ships configs/ (the shipped presets, read by metagrad.presets) inside the package as metagrad/configs."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "metagrad" / "configs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).parent / "configs", target, ignore=shutil.ignore_patterns("*.py*", ".*"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
