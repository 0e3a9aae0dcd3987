"""Fine-tuning measurably teaches the toy base: a new concept (LoRA, full + 8-bit AdamW) and single-image StyleDrop.

Each test trains a shipped recipe on the CPU (seeded: masks, dropout, data order, init), then samples fixed prompts
with fixed seeds and asserts the rates of the exact classifier (`amused_tune.toy.finetune_eval`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import toy_components

from amused_tune.cli.args import parse_recipe
from amused_tune.toy import toy_dir
from amused_tune.toy.evaluate import read_sampling_defaults
from amused_tune.toy.finetune_eval import EVAL_FILE, evaluate_run, finetune_numbers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_numbers():
    return finetune_numbers(toy_components(), read_sampling_defaults(toy_dir()))


def _train_and_measure(recipe: str, tmp_path: Path, base_numbers: dict) -> dict:
    from amused_tune.train.loop import train

    os.environ.setdefault("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    recipe_obj, _, _ = parse_recipe([str(ROOT / "recipes" / recipe), f"--output.dir={tmp_path / 'run'}",
                                     "--output.loss_plot=false"])
    cwd = os.getcwd()
    os.chdir(ROOT)  # the recipes' data paths are relative to the kit
    try:
        train(recipe_obj)
    finally:
        os.chdir(cwd)
    result = evaluate_run(toy_components(), tmp_path / "run", read_sampling_defaults(toy_dir()), print,
                          base_numbers=base_numbers)
    assert json.loads((tmp_path / "run" / EVAL_FILE).read_text()) == json.loads(json.dumps(result))
    return result


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_the_base_draws_neither_the_new_concept_nor_the_style(base_numbers):
    assert base_numbers["concept"] < 0.10
    assert base_numbers["style_with"] < 0.05 and base_numbers["style_without"] < 0.05
    assert base_numbers["world"] >= 0.90


def _assert_concept_learnt(result: dict) -> None:
    base, tuned = result["base"], result["adapter"]
    assert tuned["concept"] >= 0.80, tuned
    assert tuned["world"] >= base["world"] - 0.10, (base, tuned)


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_lora_teaches_a_new_concept(tmp_path, base_numbers):
    _assert_concept_learnt(_train_and_measure("toy_concept_lora.yaml", tmp_path, base_numbers))


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_full_finetuning_with_8bit_adamw_teaches_a_new_concept(tmp_path, base_numbers):
    pytest.importorskip("bitsandbytes")
    _assert_concept_learnt(_train_and_measure("toy_concept_full8bit.yaml", tmp_path, base_numbers))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, base_numbers):
    return _train_and_measure("quickstart.yaml", tmp_path_factory.mktemp("quickstart"), base_numbers)["adapter"]


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_single_image_styledrop_draws_the_style_only_when_asked(quickstart):
    assert quickstart["style_with"] >= 0.80, quickstart
    assert quickstart["style_without"] < 0.10, quickstart


@pytest.mark.xfail(reason="one image + prior preservation draws the frame and the caption together in 0.46 of "
                          "samples (target 0.80; docs/toy.md, 'Single-image StyleDrop for any style image')", strict=True)
@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_single_image_styledrop_keeps_the_caption(quickstart):
    assert quickstart["style_match"] >= 0.80, quickstart


# the shipped method (the quickstart: single image, prior preservation, at most half of the tokens masked) on three
# of the six style images, one per shape, on a saturated, a dark and a light background; the full command (six
# images) is in docs/toy.md
STYLE_IMAGES_TESTED = ("yellow_square_on_blue", "red_circle_on_black", "blue_triangle_on_white")


@pytest.mark.slow
def test_styledrop_method_learns_the_style_for_any_style_image(tmp_path, monkeypatch):
    """`python -m amused_tune.toy eval --styledrop` on three images, 30 new-content prompts x 2 seeds: the worst
    image's rates (measured floors; the targets and the six-image numbers are in docs/toy.md)."""
    from amused_tune.toy.styledrop_eval import styledrop_eval

    monkeypatch.chdir(ROOT)
    result = styledrop_eval(ROOT / "recipes" / "quickstart.yaml", tmp_path / "styledrop_eval.json",
                            images=list(STYLE_IMAGES_TESTED), workdir=tmp_path / "runs")
    worst = result["worst"]
    assert set(result["images"]) == set(STYLE_IMAGES_TESTED)
    assert json.loads((tmp_path / "styledrop_eval.json").read_text())["worst"] == worst
    # measured with train.max_masking_rate 0.5 (without it: 0.45, 0.15, 0.00, 1.00, 0.03)
    assert worst["style_with"] >= 0.47, worst  # measured 0.57
    assert worst["style_match"] >= 0.43, worst  # measured 0.53
    assert worst["leak"] <= 0.05, worst  # measured 0.00
    assert worst["caption_kept"] >= 0.95, worst  # measured 1.00
    assert worst["clean"] >= 0.42, worst  # measured 0.52
