"""data.sources: several sources in one run, each with its repeats and prompt rules; every step's draws counted
(repeats 3:1), each source cached once, the data report per source, print_config round trip, exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.recipe import DataConfig, Recipe, RecipeError, SourceConfig
from amused_tune.train import step as train_step
from amused_tune.train.loop import train
from conftest import make_images, reset_accelerate
from helpers import resumed_equals_straight
from helpers import recipe_for


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return make_images(root / "subject", n=4), make_images(root / "regular", n=4)


def two_source_recipe(out, folders, steps=4):
    subject, regular = folders
    recipe = recipe_for(out, subject, max_steps=steps)
    recipe.data = DataConfig(cache=True, cache_dir=str(out.parent / "cache"), random_flip=True, sources=[
        SourceConfig(source="imagefolder", path=str(subject), repeats=3, trigger_word="sks"),
        SourceConfig(source="imagefolder", path=str(regular), repeats=1)])
    return recipe


def test_each_step_draws_by_repeats_and_each_source_is_cached_once(tmp_path, folders, monkeypatch):
    """4 steps x 2 micro-batches x 2 images = 16 draws = one epoch of 4 x 3 subject + 4 x 1 regular images."""
    drawn, original = [], train_step.compute_loss

    def spy(batch, *args, **kwargs):
        drawn.append(list(zip(batch["source"], batch["prompt"])))
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(train_step, "compute_loss", spy)
    train(two_source_recipe(tmp_path / "run", folders))
    per_step = [Counter(k for micro in drawn[i:i + 2] for k, _ in micro) for i in range(0, len(drawn), 2)]
    assert len(per_step) == 4 and all(sum(c.values()) == 4 for c in per_step)
    total = sum(per_step, Counter())
    assert (total[0], total[1]) == (12, 4)
    assert all(p.startswith("sks, ") == (k == 0) for micro in drawn for k, p in micro)  # each source's prompt rules

    tokens = sorted((tmp_path / "cache").glob("tokens-*"))
    assert len(tokens) == 2  # one cache entry per source, not per repeat
    from safetensors.torch import load_file
    assert sorted(load_file(str(next(t.glob("shard-*.safetensors"))))["tokens"].shape[0] for t in tokens) == [4, 4]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["samples"], report["used"]) == (8, 8)
    assert [s["repeats"] for s in report["sources"]] == [3, 1]


def test_resume_with_two_sources_is_bit_exact(tmp_path, folders):
    resumed_equals_straight(tmp_path, lambda out, steps: two_source_recipe(out, folders, steps))


def test_sources_round_trip_through_print_config(tmp_path, folders, capsys):
    subject, regular = folders
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": "tiny"}, "data": {"sources": [
        {"source": "imagefolder", "path": str(subject), "repeats": 10, "trigger_word": "sks"},
        {"source": "imagefolder", "path": str(regular)}]}}))
    assert cli_main([str(path), "--print_config"]) == 0
    (tmp_path / "again.yaml").write_text(capsys.readouterr().out)
    sources = parse_recipe([str(tmp_path / "again.yaml")])[0].data.sources
    assert [(s.path, s.repeats, s.trigger_word) for s in sources] == [(str(subject), 10, "sks"), (str(regular), 1, None)]


@pytest.mark.parametrize("data,fragment", [
    (DataConfig(path="x", sources=[SourceConfig(card="nouns")]), "data.sources replaces data.card/source/path"),
    (DataConfig(sources=[SourceConfig(card="nouns", repeats=0)]), r"data.sources\[0\].repeats must be >= 1"),
    (DataConfig(sources=[SourceConfig(path="x")]), r"data.sources\[0\] needs a card, or a source and a path")])
def test_bad_sources_are_one_line_errors(data, fragment):
    with pytest.raises(RecipeError, match=fragment):
        Recipe(data=data).resolve().validate()
    reset_accelerate()


def test_a_sources_keys_are_data_keys_and_one_list_names_them():
    """data.sources entries set SourceConfig's keys, each a data key of the same meaning; the command line's
    source rule drops the same keys but the trigger word."""
    import dataclasses

    from amused_tune.data.cards import OWN_KEYS, SOURCE_KEYS

    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    assert set(OWN_KEYS) <= data_keys and "repeats" not in OWN_KEYS
    assert set(OWN_KEYS) - set(SOURCE_KEYS) == {"trigger_word"}
