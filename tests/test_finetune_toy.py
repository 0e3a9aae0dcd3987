"""Fine-tuning measurably teaches the toy base: a new concept (LoRA, full + 8-bit AdamW) and single-image StyleDrop.

Each test trains a shipped recipe on the CPU (seeded: masks, dropout, data order, init), then samples fixed prompts
with fixed seeds and asserts the rates of the exact classifier (`amused_tune.toy.finetune_eval`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from toyworld_helpers import toy_components

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


def test_the_base_draws_neither_the_new_concept_nor_the_style(base_numbers):
    assert base_numbers["concept"] < 0.10
    assert base_numbers["style_with"] < 0.05 and base_numbers["style_without"] < 0.05
    assert base_numbers["world"] >= 0.90


def _assert_concept_learnt(result: dict) -> None:
    base, tuned = result["base"], result["adapter"]
    assert tuned["concept"] >= 0.80, tuned
    assert tuned["world"] >= base["world"] - 0.10, (base, tuned)


def test_lora_teaches_a_new_concept(tmp_path, base_numbers):
    _assert_concept_learnt(_train_and_measure("toy_concept_lora.yaml", tmp_path, base_numbers))


def test_full_finetuning_with_8bit_adamw_teaches_a_new_concept(tmp_path, base_numbers):
    pytest.importorskip("bitsandbytes")
    _assert_concept_learnt(_train_and_measure("toy_concept_full8bit.yaml", tmp_path, base_numbers))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, base_numbers):
    return _train_and_measure("quickstart.yaml", tmp_path_factory.mktemp("quickstart"), base_numbers)["adapter"]


def test_single_image_styledrop_draws_the_style_only_when_asked(quickstart):
    assert quickstart["style_with"] >= 0.80, quickstart
    assert quickstart["style_without"] < 0.10, quickstart


@pytest.mark.xfail(reason="the one-image LoRA paints the whole background grey, not only the frame "
                          "(measured 0.02-0.12; docs/toy.md, 'Fine-tuning')", strict=True)
def test_single_image_styledrop_keeps_the_caption(quickstart):
    assert quickstart["style_match"] >= 0.80, quickstart
