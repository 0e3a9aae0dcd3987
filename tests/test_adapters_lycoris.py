"""adapter.kind=lokr / loha: peft's LoKr and LoHa, trained by the kit, saved in peft's format (no diffusers file:
diffusers cannot load them), loaded by the kit's sampler and `amused-tune merge`, resumed bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from amused_tune.model import adapters
from amused_tune.cli.sample import load_adapters
from amused_tune.model.bases import build_tiny
from amused_tune.recipe import AdapterConfig, Recipe, RecipeError
from amused_tune.sampling.sampler import generate
from amused_tune.train.loop import train
from conftest import make_images
from helpers import final_weights, recipe_for

KINDS = ("lokr", "loha")


def lycoris_recipe(out, data, kind, max_steps=4):
    recipe = recipe_for(out, data, max_steps=max_steps)
    recipe.adapter = AdapterConfig(kind=kind, rank=4, alpha=8.0)
    recipe.optim.lr = 5e-2  # large steps: the update moves visibly in a few steps
    return recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory, data):
    """(kind, run dir, the in-memory trained components) of a 4-step run."""
    recipe = lycoris_recipe(tmp_path_factory.mktemp("run") / request.param, data, request.param)
    comps = build_tiny()
    train(recipe, comps)
    return request.param, recipe.output.dir, comps


def test_saved_in_peft_format_with_the_record_and_no_diffusers_file(trained):
    kind, run, _ = trained
    folder = f"{run}/adapter"
    config = json.loads(open(f"{folder}/{adapters.PEFT_CONFIG}").read())
    assert config["peft_type"] == kind.upper() and config["r"] == 4 and config["alpha"] == 8.0
    assert not __import__("os").path.exists(f"{folder}/{adapters.DIFFUSERS_FILE}")
    assert json.loads(open(f"{folder}/amused_tune.json").read())["base"]
    state, _ = adapters.read_adapter(run)
    prefix = "lokr_" if kind == "lokr" else "hada_"
    assert state and all(k.rsplit(".", 1)[-1].startswith(prefix) for k in state)


def test_the_kits_sampler_draws_the_in_memory_models_tokens(trained):
    _, run, comps = trained
    comps.transformer.eval()
    trained_tokens, _ = generate(comps, ["a cat"], [0])
    kit = build_tiny()
    load_adapters(kit.transformer, [str(run)])
    kit_tokens, _ = generate(kit, ["a cat"], [0])
    base_tokens, _ = generate(build_tiny(), ["a cat"], [0])
    assert torch.equal(kit_tokens, trained_tokens)
    assert not torch.equal(kit_tokens, base_tokens)  # the adapter changed what is drawn


def test_merge_then_sample_gives_base_plus_adapters_pixels(trained, tmp_path, capsys):
    from amused_tune.cli import main as cli_main

    _, run, _ = trained
    merged = tmp_path / "merged"
    assert cli_main(["merge", str(run), "--out", str(merged)]) == 0

    def pixels(name, *args):
        out = tmp_path / name
        assert cli_main(["sample", *args, "--prompt", "a cat", "--num-images", "2", "--out", str(out)]) == 0
        return [np.asarray(Image.open(f).convert("RGB")) for f in sorted(out.glob("0*-seed*.png"))]

    fused, unfused = pixels("fused", "--base", str(merged)), pixels("unfused", "--base", "tiny", "--adapter", str(run))
    assert len(fused) == 2 and all(np.array_equal(a, b) for a, b in zip(fused, unfused))


def test_merging_keeps_the_uvits_outputs(trained):
    from conftest import tiny_uvit_logits

    _, run, _ = trained
    kit = build_tiny()
    adapters.load_lora(kit.transformer, run)
    before = tiny_uvit_logits(kit.transformer)
    adapters.merge_adapters(kit.transformer)
    assert not any(k for k, _ in kit.transformer.named_parameters() if "lokr_" in k or "hada_" in k)
    torch.testing.assert_close(tiny_uvit_logits(kit.transformer), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_two_steps_then_two_more_equal_four_steps(tmp_path, data, kind):
    train(lycoris_recipe(tmp_path / "straight", data, kind))
    train(lycoris_recipe(tmp_path / "resumed", data, kind, max_steps=2))
    train(lycoris_recipe(tmp_path / "resumed", data, kind))  # train.resume=auto
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and any("lokr_" in k or "hada_" in k for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_print_config_round_trips_the_kind(capsys, tmp_path, kind):
    from amused_tune.cli import main as cli_main
    from amused_tune.cli.args import parse_recipe

    assert cli_main(["recipes/quickstart.yaml", f"--adapter.kind={kind}", "--adapter.rank=8", "--print_config"]) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    recipe = parse_recipe([str(tmp_path / "r.yaml")])[0]
    assert (recipe.adapter.kind, recipe.adapter.rank) == (kind, 8)


@pytest.mark.parametrize("change,message", [
    (dict(kind="lokr", text_encoder=True), "adapter.kind=lokr trains the U-ViT only: set adapter.text_encoder=false"),
    (dict(kind="loha", dropout=0.1), "adapter.dropout is LoRA's input dropout: adapter.kind=loha has none"),
])
def test_unsupported_combinations_are_one_line_errors(change, message):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe(adapter=AdapterConfig(**change)).resolve().validate()
    assert "\n" not in str(err.value)


def test_a_quantized_base_is_refused():
    from amused_tune.recipe import ModelConfig

    with pytest.raises(RecipeError, match="model.quantize needs adapter.kind=lora or dora: peft's lokr"):
        Recipe(model=ModelConfig(quantize="8bit"), adapter=AdapterConfig(kind="lokr")).resolve().validate()


def test_the_memory_estimate_counts_each_kinds_trainable_weights():
    from amused_tune.memory import estimate as memory
    from amused_tune.cli.args import parse_recipe

    rows = {}
    for kind in ("lora", *KINDS):
        recipe = parse_recipe(["recipes/styledrop_256.yaml", f"--adapter.kind={kind}", "--adapter.text_encoder=false"])[0]
        est = memory.estimate(recipe)
        rows[kind] = next(r for r in est.rows if r.what.endswith("weights (trainable)"))
        assert est.peak_gb > 1.0
    # LoHa holds two rank-r pairs per weight where LoRA holds one; LoKr's Kronecker factors are far smaller
    assert rows["loha"].bytes == 2 * rows["lora"].bytes and 0 < rows["lokr"].bytes < rows["lora"].bytes / 4
    assert rows["lokr"].what == "LoKr weights (trainable)" and rows["loha"].what == "LoHa weights (trainable)"


def test_peft_loads_the_adapter_and_diffusers_loader_builds_nothing_from_it(trained):
    from diffusers.loaders import AmusedLoraLoaderMixin
    from peft import PeftModel

    from conftest import tiny_uvit_logits

    _, run, _ = trained
    kit = build_tiny()
    adapters.load_lora(kit.transformer, run)
    peft_model = PeftModel.from_pretrained(build_tiny().transformer, f"{run}/adapter")
    torch.testing.assert_close(tiny_uvit_logits(peft_model.base_model.model), tiny_uvit_logits(kit.transformer))
    plain = build_tiny()  # diffusers reads LoRA / DoRA only: it loads none of these weights, without an error
    state, alphas = AmusedLoraLoaderMixin.lora_state_dict(f"{run}/adapter", weight_name=adapters.PEFT_FILE)
    AmusedLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=plain.transformer)
    assert not [n for n, _ in plain.transformer.named_parameters() if "lokr_" in n or "hada_" in n or "lora_" in n]


def test_the_model_card_names_the_kind_and_shows_no_diffusers_loader(trained):
    from amused_tune.share.hub import read_recipe, render_card

    kind, run, _ = trained
    text = render_card(run, read_recipe(run))
    assert f"A {'LoKr' if kind == 'lokr' else 'LoHa'} (peft) (rank 4, alpha 8.0" in text and f"- {kind}\n" in text
    assert "AmusedLoraLoaderMixin" not in text and "full-fine-tune" not in text and "full fine-tune" not in text
    assert f"PeftModel.from_pretrained(pipe.transformer, \"{run}/adapter\")" in text


@pytest.mark.parametrize("kind", KINDS)
def test_max_memory_never_offers_a_quantized_base_to_lokr_or_loha(kind):
    from amused_tune.memory.fit import _levers

    levers = _levers(Recipe(adapter=AdapterConfig(kind=kind)))
    assert [already for key, _, already in levers if key == "model.quantize"] == [True, True]  # skipped
    assert [already for key, _, already in _levers(Recipe()) if key == "model.quantize"] == [False, False]
