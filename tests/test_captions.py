"""Caption rules: data.trigger_word in front, data.shuffle_tags with data.keep_tags (per draw, by the sample's seed,
encoded live instead of from the text cache), data.caption_dropout as the empty-prompt mechanism; resume exact."""

from __future__ import annotations

import json
import random

import pytest

from amused_tune.data.captions import shuffle_tags, with_trigger
from amused_tune.recipe import DataConfig, Recipe, RecipeError
from amused_tune.train.loop import set_up
from conftest import make_images, reset_accelerate
from helpers import resumed_equals_straight
from helpers import recipe_for

CAPTION = "a red square, big, left, shiny, old"


def test_trigger_word_is_the_first_tag_once():
    assert with_trigger(CAPTION, "sks") == "sks, " + CAPTION
    assert with_trigger("sks, a dog", "sks") == "sks, a dog"
    assert with_trigger(CAPTION, None) == CAPTION


def test_shuffle_keeps_the_trigger_and_the_first_n_tags_in_place_and_every_tag():
    prompt = with_trigger(CAPTION, "sks")
    orders = {shuffle_tags(prompt, 1, random.Random(seed), "sks") for seed in range(20)}
    assert len(orders) > 5
    for order in orders:
        tags = order.split(", ")
        assert tags[:2] == ["sks", "a red square"]
        assert sorted(tags) == sorted(prompt.split(", "))
    assert shuffle_tags(prompt, 1, random.Random(3), "sks") == shuffle_tags(prompt, 1, random.Random(3), "sks")


@pytest.mark.parametrize("data,fragment", [(dict(caption_dropout=1.5), "data.caption_dropout must be in [0, 1]"),
                                           (dict(keep_tags=-1, shuffle_tags=True), "data.keep_tags must be >= 0"),
                                           (dict(keep_tags=2), "set data.shuffle_tags=true")])
def test_bad_caption_values_are_one_line_errors(data, fragment):
    with pytest.raises(RecipeError, match=fragment.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        Recipe(data=DataConfig(**data)).resolve().validate()


def test_caption_dropout_is_the_condition_dropout_probability():
    recipe = Recipe(data=DataConfig(caption_dropout=0.25)).resolve().validate()
    assert recipe.train.cond_dropout == 0.25
    assert Recipe().resolve().validate().train.cond_dropout == 0.1  # unset: train.cond_dropout as given


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = make_images(tmp_path_factory.mktemp("data"))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["text"] = f"picture {i}, red, square, big, left"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def caption_recipe(out, data, steps=4, cache=True):
    recipe = recipe_for(out, data, max_steps=steps)
    recipe.data.cache = cache
    recipe.data.cache_dir = str(out.parent / "cache")
    recipe.data.trigger_word, recipe.data.shuffle_tags, recipe.data.keep_tags = "sks", True, 1
    return recipe


@pytest.mark.parametrize("cache", [True, False])
def test_a_run_draws_shuffled_prompts_with_the_trigger_and_no_cached_text(tmp_path, data, cache):
    run = set_up(caption_recipe(tmp_path / "run", data, cache=cache), None)
    items = [run.dataset[(0, seed)] for seed in range(12)]
    reset_accelerate()
    assert all("hidden" not in item for item in items)  # encoded live by the training step
    prompts = {item["prompt"] for item in items}
    assert len(prompts) > 2
    assert all(p.startswith("sks, picture ") for p in prompts)
    assert run.dataset[(0, 5)]["prompt"] == run.dataset[(0, 5)]["prompt"]


def test_resume_with_shuffled_tags_is_bit_exact(tmp_path, data):
    resumed_equals_straight(tmp_path, lambda out, steps: caption_recipe(out, data, steps))


def test_caption_keys_round_trip_through_print_config(capsys, tmp_path):
    from amused_tune.cli import main as cli_main
    from amused_tune.cli.args import parse_recipe

    argv = ["recipes/quickstart.yaml", "--data.trigger_word=sks", "--data.shuffle_tags=true", "--data.keep_tags=2",
            "--data.caption_dropout=0.05"]
    assert cli_main(argv + ["--print_config"]) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    d = parse_recipe([str(tmp_path / "r.yaml")])[0].data
    assert (d.trigger_word, d.shuffle_tags, d.keep_tags, d.caption_dropout) == ("sks", True, 2, 0.05)
