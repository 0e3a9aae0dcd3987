"""A built wheel, installed (not editable) in a fresh environment, is a working kit: its recipes, dataset cards and
reference images come with it, and the quickstart runs from an empty folder.

The wheel is built from a copy of the source tree (no stale build/ folder can leak into it) and installed with
--no-deps into a venv that sees this environment's packages (torch & co.), so nothing is downloaded. "This
environment" is the interpreter running the tests, a virtualenv included: a venv made with
system_site_packages=True would see the *base* interpreter's packages instead, and miss what a virtualenv holds."""

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


def venv_seeing_this_environment(folder: Path) -> Path:
    """A venv whose own site-packages comes first, then the site-packages folders of the interpreter running this
    (its sys.path entries, by a .pth file): a package installed into the venv wins over this environment's copy, and
    every dependency found here is found there, whether this is a system Python or a virtualenv. Returns its python."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=os.name != "nt").create(folder)
    python = folder / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(own) / "_tests_environment.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


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
    python = venv_seeing_this_environment(root / "venv")
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


def test_the_test_venv_sees_a_virtualenvs_own_packages(tmp_path):
    """Run from a virtualenv, the wheel's venv sees the packages installed into that virtualenv (how most people
    install the kit), not only the base interpreter's: the suite passes in a venv as in a system Python."""
    outer = tmp_path / "outer"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(outer)
    outer_python = outer / "bin" / "python"
    outer_site = subprocess.run([str(outer_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    (Path(outer_site) / "only_in_the_virtualenv.py").write_text("WHERE = 'virtualenv'\n")  # as pip would install it
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_wheel import venv_seeing_this_environment; "
            "print(venv_seeing_this_environment(__import__('pathlib').Path(sys.argv[2])))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    made = subprocess.run([str(outer_python), "-c", code, str(REPO / "tests"), str(tmp_path / "inner")],
                          check=True, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}).stdout
    inner_python = made.strip().splitlines()[-1]
    seen = subprocess.run([inner_python, "-c", "import only_in_the_virtualenv as m, torch, yaml; print(m.WHERE)"],
                          capture_output=True, text=True, env=env)
    assert seen.returncode == 0 and seen.stdout.strip() == "virtualenv", seen.stderr[-1500:]
    # the old way (system_site_packages=True) sees only the base interpreter's packages: what failed in a venv
    subprocess.run([str(outer_python), "-m", "venv", "--system-site-packages", "--without-pip", str(tmp_path / "old")],
                   check=True, env=env)
    old = subprocess.run([str(tmp_path / "old" / "bin" / "python"), "-c", "import only_in_the_virtualenv"],
                         capture_output=True, text=True, env=env)
    assert old.returncode != 0 and "only_in_the_virtualenv" in old.stderr
