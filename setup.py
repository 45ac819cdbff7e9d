"""Build hook: a wheel carries the folders the app reads at run time.

frontend/, migrations/ and models/presets.toml stay at the top of the repository (the layout the
project is read in); building a wheel copies them into the package as app/_shipped/, where
app/resources.py finds them when the app runs from an installed wheel. Editable installs and
checkouts read them in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"frontend": "frontend", "migrations": "migrations", "models/presets.toml": "models"}


class BuildPyWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "app" / "_shipped"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for source, folder in SHIPPED.items():
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, target / folder, ignore=ignore, dirs_exist_ok=True)
            else:
                (target / folder).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / folder / src.name)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
