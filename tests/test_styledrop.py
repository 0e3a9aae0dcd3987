"""StyleDrop (issue 4): the Table 4 recipes, running them on the tiny model, and round 2 with human feedback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.cli.styledrop_round2 import main as round2_main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,base,alpha,lr,memory", [
    ("styledrop_256", "amused/amused-256", 32.0, 4.0e-4, "6.5 GB"),
    ("styledrop_512", "amused/amused-512", 1.0, 1.0e-3, "5.6 GB"),
])
def test_recipes_follow_table_4(name, base, alpha, lr, memory):
    path = REPO / "recipes" / f"{name}.yaml"
    recipe, _, _ = parse_recipe([str(path)])
    assert recipe.model.base == base and recipe.model.resolution is None
    assert (recipe.adapter.kind, recipe.adapter.rank, recipe.adapter.alpha) == ("lora", 16, alpha)
    assert recipe.adapter.targets == ["to_q", "to_k", "to_v"]
    assert recipe.optim.lr == lr and recipe.train.batch_size == 1 and recipe.train.grad_accum == 1
    assert recipe.train.max_steps == 1500 and recipe.data.card == "styledrop"
    assert all(p.endswith("in [V] style") for p in recipe.validation.prompts) and recipe.validation.prompts
    header = path.read_text().split("\nmodel:")[0]
    assert memory in header and "datasets_cards/styledrop.yaml" in header and f"amused-tune recipes/{name}.yaml" in header
    image = Image.open(REPO / "assets" / "styledrop" / "mushroom.png")
    assert min(image.size) >= 512  # no upscaling at either resolution


@pytest.fixture(scope="module")
def round1(tmp_path_factory):
    """`amused-tune recipes/styledrop_256.yaml --model.base=tiny --train.max_steps=5`, from another directory."""
    tmp = tmp_path_factory.mktemp("styledrop")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the card's image path resolves from the kit's folder
        mp.setenv("AMUSED_TUNE_CACHE", str(tmp / "cache"))
        code = cli_main([str(REPO / "recipes" / "styledrop_256.yaml"), "--model.base=tiny", "--train.max_steps=5",
                         "--validation.steps=2"])
        yield code, tmp / "runs" / "styledrop_256"


def test_styledrop_256_runs_offline_on_the_tiny_model(round1):
    code, run = round1
    assert code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 5
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "data_report.json").read_text())["used"] == 1


def test_round2_candidates_pick_dataset_and_recipe(round1, tmp_path, capsys, monkeypatch):
    _, run = round1
    monkeypatch.setenv("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# style probes\nA house in [V] style\n\nA boat in [V] style\n")
    out = tmp_path / "round2"
    args = [str(run), "--prompts", str(prompts), "--per-prompt", "2", "--steps", "2", "--out", str(out)]
    assert round2_main(args) == 0
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A house in [V] style"] * 2 + ["A boat in [V] style"] * 2 + [
        "A mushroom in [V] style"]
    first = Image.open(out / rows[0]["file_name"])
    assert first.size == (32, 32) and first.text["prompt"] == "A house in [V] style"
    assert round2_main(args) == 2  # candidates exist: no silent overwrite

    (out / rows[1]["file_name"]).unlink()  # the person deletes a miss
    assert round2_main([str(run), "--finalize", "--out", str(out)]) == 0
    kept = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [k["file_name"] for k in kept] == [r["file_name"] for r in rows if r is not rows[1]]
    recipe_path = out / "round2.yaml"
    assert f"amused-tune {recipe_path}" in capsys.readouterr().out
    written = yaml.safe_load(recipe_path.read_text())
    assert written["data"]["source"] == "imagefolder" and written["data"]["path"] == str(out.resolve())
    assert written["adapter"]["alpha"] == 32.0 and written["output"]["dir"].endswith("styledrop_256-round2")

    round2_run = tmp_path / "round2_run"
    code = cli_main([str(recipe_path), "--train.max_steps=1", f"--output.dir={round2_run}", "--validation.prompts=[]"])
    assert code == 0
    assert json.loads((round2_run / "data_report.json").read_text())["used"] == 4


def test_round2_errors_are_one_line(tmp_path, capsys):
    assert round2_main([str(tmp_path), "--prompts", "p.txt"]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
    assert round2_main([str(tmp_path)]) == 2
    assert "--prompts" in capsys.readouterr().err
