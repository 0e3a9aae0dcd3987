"""LoRA interop, both ways, pinned by logits on the tiny model.

  kit -> diffusers   `AmusedLoraLoaderMixin.lora_state_dict(..., return_lora_metadata=True)` + `load_lora_into_*`
  kit -> peft        `PeftModel.from_pretrained` (U-ViT at the adapter folder, text encoder in text_encoder/)
  diffusers -> kit   a `pytorch_lora_weights.safetensors` as diffusers' train_amused.py writes it
                     (`AmusedLoraLoaderMixin.save_lora_weights`, keys `transformer.<module>.lora_A.weight`, no alpha):
                     the kit reads alpha = rank, says so, and agrees with diffusers' own reading of the file
  peft -> kit        a folder written by `PeftModel.save_pretrained`

The adapters have random (not zero) B matrices, so that a load that silently did nothing would fail. Tolerance:
exact up to fp32 reordering, atol = rtol = 1e-6 (the adapters move the logits by > 0.1).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open

from amused_tune.model import adapters
from amused_tune.model.bases import build_tiny, encode_prompts
from conftest import tiny_uvit_logits as logits

TOL = dict(atol=1e-6, rtol=1e-6)
PROMPTS = ["a red circle", "a cat in [v] style"]


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def kit_adapter(tmp_path_factory):
    """An adapter the kit wrote (rank 4, alpha 8: scale 2), on the U-ViT and the text encoder; and its outputs."""
    comps = build_tiny()
    adapters.attach_lora(comps.transformer, rank=4, alpha=8)
    adapters.attach_lora(comps.text_encoder, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"])
    randomize_lora(comps.transformer, 1)
    randomize_lora(comps.text_encoder, 2)
    folder = adapters.save_lora(tmp_path_factory.mktemp("interop") / "adapter", comps.transformer, comps.text_encoder,
                                base_model="tiny")
    expected = logits(comps.transformer)
    assert (expected - logits(build_tiny().transformer)).abs().max() > 0.1
    text = encode_prompts(comps.text_encoder, comps.tokenizer, PROMPTS)
    assert (text[0] - encode_prompts(build_tiny().text_encoder, comps.tokenizer, PROMPTS)[0]).abs().max() > 0.1
    return folder, expected, text


def assert_text_close(text_encoder, tokenizer, expected):
    for got, want in zip(encode_prompts(text_encoder, tokenizer, PROMPTS), expected):
        torch.testing.assert_close(got, want, **TOL)


def test_kit_adapter_loads_in_diffusers_with_alpha_kept(kit_adapter):
    from diffusers.loaders import AmusedLoraLoaderMixin

    folder, expected, expected_text = kit_adapter
    state_dict, network_alphas, metadata = AmusedLoraLoaderMixin.lora_state_dict(
        folder, weight_name=adapters.DIFFUSERS_FILE, return_lora_metadata=True)
    fresh = build_tiny()
    AmusedLoraLoaderMixin.load_lora_into_transformer(
        state_dict, network_alphas=network_alphas, transformer=fresh.transformer, metadata=metadata)
    AmusedLoraLoaderMixin.load_lora_into_text_encoder(
        state_dict, network_alphas=network_alphas, text_encoder=fresh.text_encoder, prefix="text_encoder",
        metadata=metadata)
    to_q = fresh.transformer.transformer_layers[0].attn1.to_q
    assert list(to_q.scaling.values()) == [2.0]  # alpha 8 / rank 4: not the half strength of alpha lost
    torch.testing.assert_close(logits(fresh.transformer), expected, **TOL)
    assert_text_close(fresh.text_encoder, fresh.tokenizer, expected_text)


def test_kit_adapter_loads_in_peft(kit_adapter):
    folder, expected, expected_text = kit_adapter
    fresh = build_tiny()
    transformer = PeftModel.from_pretrained(fresh.transformer, folder)
    assert transformer.peft_config["default"].lora_alpha == 8 and transformer.peft_config["default"].r == 4
    torch.testing.assert_close(logits(transformer), expected, **TOL)
    text_encoder = PeftModel.from_pretrained(fresh.text_encoder, folder / "text_encoder")
    assert_text_close(text_encoder, fresh.tokenizer, expected_text)


def test_kit_adapter_reloads_in_the_kit(kit_adapter):
    folder, expected, expected_text = kit_adapter
    fresh = build_tiny()
    adapters.load_lora(fresh.transformer, folder)
    adapters.load_lora(fresh.text_encoder, folder, part="text_encoder")
    torch.testing.assert_close(logits(fresh.transformer), expected, **TOL)
    assert_text_close(fresh.text_encoder, fresh.tokenizer, expected_text)


@pytest.fixture(scope="module")
def diffusers_file(tmp_path_factory):
    """What diffusers' examples/amused/train_amused.py saves: rank 4, alpha 8 in training, alpha not in the file."""
    from diffusers.loaders import AmusedLoraLoaderMixin

    model = build_tiny().transformer
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]))
    randomize_lora(model, 3)
    folder = tmp_path_factory.mktemp("interop") / "train_amused_output"
    AmusedLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model))
    return folder / "pytorch_lora_weights.safetensors"


def test_diffusers_style_file_loads_in_the_kit_with_alpha_equal_to_rank(diffusers_file, caplog):
    from diffusers.loaders import AmusedLoraLoaderMixin

    with safe_open(diffusers_file, framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert adapters.METADATA_KEY not in meta  # no alpha anywhere in the file

    kit = build_tiny().transformer
    with caplog.at_level(logging.WARNING, logger="amused_tune.model.adapters"):
        adapters.load_lora(kit, diffusers_file.parent)
    assert "alpha = rank" in caplog.text
    assert list(kit.transformer_layers[0].attn1.to_q.scaling.values()) == [1.0]

    state_dict, network_alphas = AmusedLoraLoaderMixin.lora_state_dict(diffusers_file.parent)
    reference = build_tiny().transformer
    AmusedLoraLoaderMixin.load_lora_into_transformer(state_dict, network_alphas=network_alphas, transformer=reference)
    expected = logits(reference)  # diffusers reads the same file the same way
    assert (expected - logits(build_tiny().transformer)).abs().max() > 0.1
    torch.testing.assert_close(logits(kit), expected, **TOL)


def test_sample_command_loads_a_diffusers_style_file(diffusers_file, tmp_path):
    """`amused-tune sample --adapter FILE` (the kit's CLI path: sample_cli.load_adapters -> adapters.load_lora)."""
    pytest.importorskip("amused_tune.cli.sample")
    from amused_tune.cli import main as cli_main

    out = tmp_path / "samples"
    code = cli_main(["sample", "--base", "tiny", "--adapter", str(diffusers_file), "--prompt", "a cat",
                     "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert code == 0
    assert list(out.glob("*.png"))


def test_peft_folder_loads_in_the_kit(tmp_path):
    model = get_peft_model(build_tiny().transformer, LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_v"]))
    randomize_lora(model, 4)
    expected = logits(model)
    model.save_pretrained(tmp_path / "peft-adapter")
    assert json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())["lora_alpha"] == 16

    kit = build_tiny().transformer
    adapters.load_lora(kit, tmp_path / "peft-adapter")
    assert list(kit.transformer_layers[0].attn1.to_q.scaling.values()) == [4.0]
    torch.testing.assert_close(logits(kit), expected, **TOL)
