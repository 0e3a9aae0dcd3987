"""adapter.kind=dora: peft's weight-decomposed LoRA, trained by the kit, saved in diffusers' and peft's formats; the
adapter loads in plain diffusers + peft and samples the same tokens there as in the kit's sampler."""

from __future__ import annotations

import warnings

import pytest
import torch

from amused_tune.model import adapters
from amused_tune.model.bases import build_tiny
from amused_tune.recipe import AdapterConfig
from amused_tune.sampling.sampler import generate
from amused_tune.train.loop import train
from conftest import make_images
from helpers import recipe_for


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    data = make_images(tmp_path_factory.mktemp("data"))
    recipe = recipe_for(tmp_path_factory.mktemp("run") / "dora", data, max_steps=3)
    recipe.adapter = AdapterConfig(kind="dora", rank=4, alpha=8.0)
    recipe.optim.lr = 5e-2  # large steps: the magnitudes and directions move visibly in 3 steps
    train(recipe)
    return recipe.output.dir


def test_a_dora_run_saves_magnitudes_in_both_formats(dora_run):
    state, config = adapters.read_adapter(dora_run)
    magnitudes = [k for k in state if k.endswith(".lora_magnitude_vector")]
    assert config.use_dora and magnitudes and len(magnitudes) == len(config.target_modules)
    peft_state, peft_config = adapters.read_adapter(f"{dora_run}/adapter/{adapters.PEFT_FILE}")
    assert peft_config.use_dora and peft_state.keys() == state.keys()


def test_dora_loads_in_plain_diffusers_and_peft_and_samples_the_kits_tokens(dora_run):
    from diffusers import AmusedPipeline
    from diffusers.loaders import AmusedLoraLoaderMixin

    kit = build_tiny()
    adapters.load_lora(kit.transformer, dora_run)
    plain = build_tiny()
    state_dict, alphas, metadata = AmusedLoraLoaderMixin.lora_state_dict(
        f"{dora_run}/adapter", weight_name=adapters.DIFFUSERS_FILE, return_lora_metadata=True)
    AmusedLoraLoaderMixin.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=plain.transformer,
                                                     metadata=metadata)
    to_q = plain.transformer.transformer_layers[0].attn1.to_q
    assert to_q.use_dora[next(iter(to_q.use_dora))]  # diffusers built a DoRA layer from the file
    base_tokens, _ = generate(build_tiny(), ["a cat"], [0])
    kit_tokens, _ = generate(kit, ["a cat"], [0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = AmusedPipeline(vqvae=plain.vqvae, tokenizer=plain.tokenizer, text_encoder=plain.text_encoder,
                              transformer=plain.transformer, scheduler=plain.scheduler)
    pipe.set_progress_bar_config(disable=True)
    plain_tokens = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(kit_tokens, plain_tokens)
    assert not torch.equal(kit_tokens, base_tokens)  # the adapter changed what is drawn


def test_dora_loads_in_peft(dora_run):
    from peft import PeftModel

    expected = adapters.read_adapter(dora_run)[0]
    model = PeftModel.from_pretrained(build_tiny().transformer, f"{dora_run}/adapter")
    got = {k.removeprefix("base_model.model.").replace(".default", ""): v
           for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in expected.items():
        torch.testing.assert_close(got[key if key in got else key + ".weight"], value)


def test_dora_merges_into_the_same_outputs(dora_run):
    from conftest import tiny_uvit_logits

    kit = build_tiny()
    adapters.load_lora(kit.transformer, dora_run)
    before = tiny_uvit_logits(kit.transformer)
    adapters.merge_adapters(kit.transformer)
    torch.testing.assert_close(tiny_uvit_logits(kit.transformer), before, atol=1e-4, rtol=1e-4)


def test_a_lora_on_the_output_convolutions_reloads_as_trained(tmp_path):
    """peft puts a LoRA on Conv2d layers too (here the U-ViT's output head, mlm_layer.conv1/conv2): the saved
    adapter loads back with the conv shapes and gives the trained model's logits; a conv LoRA whose B is not the
    1x1 conv peft builds is refused, naming the shape it needs."""
    from conftest import tiny_uvit_logits
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    data = make_images(tmp_path / "data")
    recipe = recipe_for(tmp_path / "run", data, max_steps=2)
    recipe.adapter = AdapterConfig(rank=4, alpha=8.0, targets=["to_q", "to_k", "to_v", "mlm_layer.conv1",
                                                                  "mlm_layer.conv2"])
    recipe.optim.lr = 5e-2
    train(recipe)
    state, config = adapters.read_adapter(recipe.output.dir)
    assert tuple(state["mlm_layer.conv2.lora_A.weight"].shape)[0] == 4
    assert state["mlm_layer.conv2.lora_B.weight"].shape[2:] == (1, 1)
    kit = build_tiny()
    base = tiny_uvit_logits(kit.transformer)
    adapters.load_lora(kit.transformer, recipe.output.dir)
    loaded = tiny_uvit_logits(kit.transformer)
    assert not torch.allclose(loaded, base)
    trained = build_tiny()
    adapters.attach_lora(trained.transformer, rank=4, alpha=8, targets=config.target_modules)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_" in name:
                key = name.replace(".default", "")
                p.copy_(state[key])
    torch.testing.assert_close(loaded, tiny_uvit_logits(trained.transformer))

    file = tmp_path / "run" / "adapter" / adapters.DIFFUSERS_FILE
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    raw = load_file(file)
    key = "transformer.mlm_layer.conv2.lora_B.weight"
    raw[key] = torch.zeros(raw[key].shape[0], 4, 3, 3)  # a 3x3 B: not what peft builds on a 1x1 conv
    bad = tmp_path / "bad.safetensors"
    save_file(raw, bad, metadata=meta)
    with pytest.raises(adapters.AdapterError, match=r"mlm_layer.conv2.lora_B.weight has shape .*needs \(\d+, 4, 1, 1\)"):
        adapters.load_lora(build_tiny().transformer, bad)
