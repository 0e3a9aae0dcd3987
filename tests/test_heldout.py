"""validation.holdout: N images kept out of training, scored with fixed masks at every validation step; logged to
metrics.jsonl, the loss plot and the card; the same weights score the same number."""

from __future__ import annotations

import json

import pytest
import torch

from amused_tune.recipe import Recipe, RecipeError, ValidationConfig
from amused_tune.train import heldout
from amused_tune.train.loop import train
from conftest import make_images, reset_accelerate
from helpers import recipe_for


def test_split_holds_out_n_items_by_seed_and_trains_on_the_rest():
    items = list(range(10))
    kept, held = heldout.split(items, 3, seed=0)
    assert len(held) == 3 and len(kept) == 7
    assert sorted(list(kept.indices) + list(held.indices)) == items
    assert heldout.split(items, 3, seed=0)[1].indices == held.indices  # the same images every run
    seen = {}
    part = heldout.Part(type("Fake", (), {"__getitem__": lambda self, key: seen.setdefault("key", key)})(), [7, 9])
    part[(1, 5)]
    assert seen["key"] == (9, 5)  # (index, seed) keys reach the dataset with its own index
    assert heldout.split(items, 0, seed=0) == (items, None)


def test_holding_out_everything_is_a_one_line_error():
    with pytest.raises(RecipeError, match=r"validation\.holdout=4 would hold out every image"):
        heldout.split(list(range(4)), 4, seed=0)
    with pytest.raises(RecipeError, match=r"validation\.holdout must be >= 0"):
        Recipe(validation=ValidationConfig(holdout=-1)).resolve().validate()


def test_fixed_mask_masks_exactly_the_rate_and_repeats_with_its_seed():
    tokens = torch.arange(2 * 4 * 4).reshape(2, 4, 4)
    ids, mask = heldout.fixed_mask(tokens, 99, 0.5, torch.Generator().manual_seed(1))
    assert mask.flatten(1).sum(1).tolist() == [8, 8]
    assert torch.equal(ids[mask], torch.full((16,), 99)) and torch.equal(ids[~mask], tokens[~mask])
    again = heldout.fixed_mask(tokens, 99, 0.5, torch.Generator().manual_seed(1))[1]
    assert torch.equal(mask, again)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data"), n=6)


def test_a_run_logs_the_heldout_loss_on_validation_steps_plot_and_card(tmp_path, data):
    recipe = recipe_for(tmp_path / "run", data, max_steps=4)
    recipe.validation = ValidationConfig(holdout=2, every=2)
    recipe.output.loss_plot = True
    train(recipe)
    reset_accelerate()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held = [(r["step"], r["heldout_loss"]) for r in rows if "heldout_loss" in r]
    assert [s for s, _ in held] == [0, 2, 4]
    assert all(0 < loss < 20 for _, loss in held)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report  # the data report still describes every usable image
    assert (tmp_path / "run" / "loss.png").is_file()
    assert "Held-out loss" in (tmp_path / "run" / "README.md").read_text()


def test_the_same_weights_score_the_same_heldout_loss(tmp_path, data):
    """Comparable step to step: fixed variants and masks, so scoring twice gives the same number."""
    from amused_tune.train.loop import set_up

    recipe = recipe_for(tmp_path / "run", data, max_steps=1)
    recipe.validation = ValidationConfig(holdout=3)
    run = set_up(recipe, None)
    first = run.heldout(run.comps.transformer, run.empty, run.accelerator)
    second = run.heldout(run.comps.transformer, run.empty, run.accelerator)
    reset_accelerate()
    assert first == second and len(run.dataset) == 3


def test_holdout_and_dora_round_trip_through_print_config(capsys, tmp_path):
    from amused_tune.cli import main as cli_main
    from amused_tune.cli.args import parse_recipe

    assert cli_main(["recipes/quickstart.yaml", "--validation.holdout=3", "--adapter.kind=dora", "--print_config"]) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    recipe = parse_recipe([str(tmp_path / "r.yaml")])[0]
    assert (recipe.validation.holdout, recipe.adapter.kind) == (3, "dora")
