"""Real-size shapes (random weights, no download): the amused-256 LoRA recipe trains a step end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from amused_tune.cli.args import parse_recipe
from amused_tune.model.bases import build_real_size
from amused_tune.train.loop import train
from conftest import make_images

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_amused_256_lora_recipe_trains_a_step_at_real_size(tmp_path):
    data = make_images(tmp_path / "data", n=2, size=256)
    recipe, _, _ = parse_recipe([
        str(REPO / "recipes/nouns_256_lora_bs1x16.yaml"), "--data.card=null", "--data.source=imagefolder",
        f"--data.path={data}", "--data.cache=false", "--train.grad_accum=2", "--train.max_steps=1",
        "--train.precision=fp32", "--model.dtype=fp32", "--train.grad_checkpointing=true",
        f"--output.dir={tmp_path / 'run'}", "--validation.prompts=[]",
    ])
    comps = build_real_size(256)
    summary = train(recipe, components=comps)
    assert summary["step"] == 1 and 8.0 < summary["loss"] < 10.5  # ~ln(8192) = 9.01 for a random model
    with safe_open(tmp_path / "run/adapter/pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 168 * 2  # lora_A and lora_B of 168 QKV projections
    assert all(k.startswith("transformer.") for k in keys)
