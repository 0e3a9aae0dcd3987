"""Build hook: a wheel carries the kit's top-level folders (recipes/, datasets_cards/, assets/) inside the package,
as amused_tune/kit/, so that an installed kit finds its recipes, dataset cards and reference images without the
source tree (amused_tune.common.kit_path looks in the checkout first, then there). Everything else about the
package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KIT_FOLDERS = ("recipes", "datasets_cards", "assets")  # amused_tune.common.KIT_FOLDERS


class BuildWithKitFolders(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        kit = Path(self.build_lib) / "amused_tune" / "kit"
        for name in KIT_FOLDERS:
            if (root / name).is_dir():
                shutil.rmtree(kit / name, ignore_errors=True)
                shutil.copytree(root / name, kit / name, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildWithKitFolders})
