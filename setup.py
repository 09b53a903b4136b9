"""Build step: a wheel carries the shipped recipes (`configs/`) and ranked answers
(`reward_data/`) as package data under `pipeline/_presets/`, copied from the top-level
directories, which stay their one source (`pipeline/presets.py` finds either). Everything else is
in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("configs", "reward_data")


class BuildPyWithPresets(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "pipeline" / "_presets"
        for name in SHIPPED:
            shutil.copytree(ROOT / name, target / name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithPresets})
