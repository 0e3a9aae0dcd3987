"""A built wheel, installed (not editable) in a fresh environment, is a working kit: its recipes, dataset cards and
reference images come with it, and the quickstart runs from an empty folder.

The wheel is built from a copy of the source tree (no stale build/ folder can leak into it) and installed with
--no-deps into a venv that sees this environment's packages (torch & co.), so nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "samples")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """(venv python, its amused-tune script, environment) with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    import importlib.util

    # with setuptools here, build with it (offline); else pip fetches the build requirements itself
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(root / "dist"),
                    str(src)], check=True, capture_output=True, text=True)
    wheel = next((root / "dist").glob("amused_tune-*.whl"))
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMUSED_TUNE_CARDS")}
    env.update(HF_HUB_OFFLINE="1", AMUSED_TUNE_CACHE=str(root / "cache"))
    return python, root / "venv" / "bin" / "amused-tune", env, root


def run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_installed_package_is_the_wheel_not_this_checkout(kit, tmp_path):
    python, _, env, root = kit
    where = run([python, "-c", "import amused_tune; print(amused_tune.__file__)"], tmp_path, env).stdout.strip()
    assert Path(where).is_relative_to(root / "venv") and not Path(where).is_relative_to(REPO)


def test_recipes_lists_every_recipe_and_cp_copies_one(kit, tmp_path):
    _, script, env, _ = kit
    rows = json.loads(run([script, "recipes", "--json"], tmp_path, env).stdout)
    assert sorted(r["name"] for r in rows) == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    run([script, "recipes", "cp", "styledrop_256", "s.yaml"], tmp_path, env)
    assert (tmp_path / "s.yaml").read_text().startswith("# styledrop_256")


def test_dataset_cards_and_the_styledrop_image_are_found(kit, tmp_path):
    python, _, env, root = kit
    code = ("from amused_tune.data.cards import cards_dir, resolve_config; from amused_tune.data.sources import "
            "resolve_path; from amused_tune.recipe import DataConfig; d = resolve_config(DataConfig(card='styledrop'));"
            " print(cards_dir()); print(resolve_path(d.path))")
    cards, image = run([python, "-c", code], tmp_path, env).stdout.split()
    assert Path(cards).is_relative_to(root / "venv") and sorted(p.name for p in Path(cards).glob("*.yaml")) == sorted(
        p.name for p in (REPO / "datasets_cards").glob("*.yaml"))
    assert Path(image).is_relative_to(root / "venv") and Path(image).is_file() and Path(image).suffix == ".png"


def test_the_quickstart_runs_from_an_empty_folder(kit, tmp_path):
    _, script, env, _ = kit
    run([script, "recipes", "cp", "quickstart", "q.yaml"], tmp_path, env)
    result = run([script, "q.yaml", "--train.max_steps=4"], tmp_path, env)  # (the recipe's steps, fewer)
    assert "done: step 4" in result.stdout
    outputs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(outputs) == 1 and (outputs[0] / "recipe.yaml").is_file() and (outputs[0] / "metrics.jsonl").is_file()
