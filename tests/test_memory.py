"""The memory estimator: traced byte counts, the reference trainer's measured peaks, the shipped recipes' goals,
and --max-memory's levers. Everything runs on meta tensors: no weights, no GPU, no download."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from amused_tune.memory import estimate as memory

from amused_tune.memory import fit as memory_fit
from amused_tune.memory.trace import BLOCK, GpuAutocast, LiveBytes, storage_keys

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = yaml.safe_load((ROOT / "bench" / "reference_h100.yaml").read_text())["trainer"]
ROWS = [(base, key, row) for base, rows in REFERENCE.items() for key, row in rows.items()]


def recipe(name: str, *overrides: str):
    from amused_tune.cli.args import parse_recipe

    return parse_recipe([str(ROOT / "recipes" / f"{name}.yaml"), *overrides])[0]


def test_live_bytes_counts_autocast_copies_and_saved_activations_of_a_linear_layer():
    with torch.device("meta"):
        layer = torch.nn.Linear(1024, 512)
    tracker = LiveBytes(storage_keys(layer.parameters()))
    with tracker, GpuAutocast(torch.float16):
        x = torch.empty(8, 1024, device="meta", requires_grad=True)  # 32 KiB fp32
        y = layer(x)
        assert y.dtype == torch.float16
        saved = tracker.now  # x, its fp16 copy (16 KiB), the weight's fp16 copy, the output (8 KiB); not the bias's
        y.float().sum().backward()
    assert saved == 32768 + 16384 + 1024 * 512 * 2 + 8192
    assert tracker.max >= saved
    assert all(size % BLOCK == 0 for _, size in tracker.events if size > 0)


def test_attention_keeps_no_token_by_token_matrix():
    q = torch.empty(2, 16, 1024, 64, device="meta", dtype=torch.float16, requires_grad=True)
    tracker = LiveBytes()
    with tracker, GpuAutocast(torch.float16):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    assert tracker.max < 2 * 16 * 1024 * 1024 * 2  # the 1024 x 1024 scores (64 MiB in fp16) never exist


def test_eight_bit_adam_state_is_a_byte_per_element_plus_block_scales_and_fp32_below_4096():
    from amused_tune.optimizers import state_bytes

    assert state_bytes("adamw", [(10**6,)]) == 8 * 10**6
    eight = state_bytes("adamw8bit", [(10**6,), (1000,)]) - 2 * 256 * 4
    assert eight == 2 * (10**6 + 4 * 3907) + 8 * 1000


@pytest.mark.parametrize("base,key,row", ROWS, ids=[f"{b}-{k}" for b, k, _ in ROWS])
def test_reference_trainer_peaks_predicted_within_15_percent(base, key, row):
    mode, batch, accum = re.fullmatch(r"(\w+?)_bs(\d+)_ga(\d+)", key).groups()
    plan = memory.reference_plan(int(base.split("-")[1]), full=mode != "lora", adam_8bit=mode == "full8bit",
                                 batch_size=int(batch), grad_accum=int(accum))
    predicted = memory.estimate_plan(plan).peak_gb
    assert predicted == pytest.approx(row["peak_gb"], rel=0.15), f"{base} {key}: {predicted:.2f} GB predicted"


@pytest.mark.parametrize("name", ["styledrop_256", "styledrop_512", "nouns_256_lora_bs1x16",
                                  "minecraft_512_lora_bs1x8", "pixel_art_lora_256"])
def test_batch_one_lora_recipes_predicted_at_3_gb_or_less(name):
    est = memory.estimate(recipe(name))
    assert est.peak_gb <= 3.0
    assert [r.bytes for r in est.rows if r.what in ("VQ model", "text encoder")] == [0, 0]  # the cache is on


def test_reference_setup_holds_what_train_amused_keeps():
    est = memory.estimate(recipe("nouns_256_lora_bs1x16"), trainer="reference")
    held = {r.what: r for r in est.rows}
    assert held["U-ViT weights (frozen)"].bytes == 4 * 603_537_664
    assert held["VQ model"].bytes == 4 * 146_244_675
    assert held["text encoder"].detail.endswith("fp16")
    assert "VQ encode (not cached)" in est.moments


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_max_memory_turns_levers_on_keeping_the_effective_batch_lr_and_data():
    original = recipe("nouns_256_lora_bs16x1")
    said = []
    fitted = memory_fit.fit(original, memory_fit.parse_size("4GB"), say=said.append)
    assert memory.estimate(fitted).peak_bytes <= 4 * memory.GB - memory.CUDA_CONTEXT_GB * memory.GB
    assert said and said[0].startswith("--max-memory: train.grad_checkpointing: False -> True")
    assert fitted.train.batch_size * fitted.train.grad_accum == 16
    assert fitted.optim.lr == original.optim.lr and fitted.data == original.data


def test_max_memory_that_nothing_fits_is_an_estimate_error():
    with pytest.raises(memory.EstimateError, match="nothing fits in 0.6 GB"):  # (under the 4-bit U-ViT alone)
        memory_fit.fit(recipe("styledrop_256"), memory_fit.parse_size("0.6GB"), say=lambda line: None)


@pytest.mark.parametrize("text,expected", [("6GB", 6 * 10**9), ("7.5", 7.5e9), ("800MB", 8 * 10**8),
                                           ("6GiB", 6 * 2**30)])
def test_max_memory_sizes(text, expected):
    assert memory_fit.parse_size(text) == int(expected)


def test_a_bad_size_or_a_cpu_sized_base_is_an_estimate_error():
    with pytest.raises(memory.EstimateError, match="pass a size such as 6GB"):
        memory_fit.parse_size("six")
    with pytest.raises(memory.EstimateError, match="real-size aMUSEd"):
        memory.estimate(recipe("quickstart"))


def test_estimate_command_prints_the_breakdown_and_trains_nothing(capsys):
    from amused_tune.cli import main

    assert main(["recipes/styledrop_256.yaml", "--estimate", "--max-memory", "6GB"]) == 0
    out = capsys.readouterr().out
    assert "batch 1 x 1 accumulation" in out and "off the GPU (data.cache)" in out
    peak = float(re.search(r"^predicted peak .* ([0-9.]+)$", out, re.MULTILINE).group(1))
    assert 1.0 < peak <= 3.0


def test_max_memory_command_keeps_batch_times_accumulation(capsys):
    from amused_tune.cli import main

    assert main(["recipes/nouns_256_lora_bs16x1.yaml", "--estimate", "--max-memory=4GB"]) == 0
    captured = capsys.readouterr()
    assert "train.grad_checkpointing: False -> True" in captured.err
    assert "batch 16 x 1 accumulation" in captured.out or "x 16 accumulation" in captured.out


def test_max_memory_command_with_a_bad_size_is_one_line_exit_2(capsys):
    from amused_tune.cli import main

    assert main(["recipes/styledrop_256.yaml", "--estimate", "--max-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass a size such as 6GB" in err[0]


# --------------------------------------------------------------------------------------------- the trainer's order


REAL_SIZE = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")
                   if yaml.safe_load(p.read_text())["model"]["base"].startswith("amused/"))


def test_cache_encodes_4_images_at_a_time_at_256_px_and_1_at_512():  # fp32 VQ: half the pixels of a bf16 one
    assert memory.cache_batches(256) == (4, 16)
    assert memory.cache_batches(512) == (1, 16)
    assert memory.cache_batches(32) == (16, 16)  # the CPU-sized models: at most 16


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
@pytest.mark.parametrize("overrides", [(), ("--model.dtype=fp32",)], ids=["as-shipped", "fp32-encoders"])
def test_building_the_cache_holds_less_than_a_training_step_for_every_real_size_recipe(overrides):
    assert len(REAL_SIZE) >= 20
    for name in REAL_SIZE:
        est = memory.estimate(recipe(name, "--data.cache=true", *overrides))
        assert est.at(memory.ENCODING) < est.at("forward/backward"), name
        assert est.resident[memory.ENCODING] == 0  # the U-ViT is placed after the cache is built
    lora_512 = memory.estimate(recipe("styledrop_512"))
    assert lora_512.at(memory.ENCODING) / memory.GB == pytest.approx(1.54, abs=0.02)  # was 7.2 with every weight on (1.25 before the VQ model was held in fp32)


def test_validation_decode_is_counted_for_one_image():
    one = memory.estimate(recipe("minecraft_512_lora_bs1x8", "--validation.prompts=[a]"))
    eight = memory.estimate(recipe("minecraft_512_lora_bs1x8", "--validation.prompts=[a,b,c,d,e,f,g,h]"))
    assert one.at("validation: VQ decode") == eight.at("validation: VQ decode")
    assert eight.at("validation: VQ decode") / memory.GB == pytest.approx(2.70, abs=0.02)  # fp32 VQ (was 2.01)


def tiny_cached_recipe(tmp_path: Path, folder: Path):
    from amused_tune.recipe import (AdapterConfig, DataConfig, ModelConfig, OptimConfig, OutputConfig, Recipe,
                                    TrainConfig)

    return Recipe(model=ModelConfig(base="tiny"),
                  data=DataConfig(source="imagefolder", path=str(folder), cache=True, cache_dir=str(tmp_path / "c")),
                  adapter=AdapterConfig(kind="lora", rank=4, alpha=8.0), optim=OptimConfig(lr=1e-3),
                  train=TrainConfig(batch_size=1, grad_accum=1, max_steps=1, precision="fp32", checkpoint_every=100),
                  output=OutputConfig(dir=str(tmp_path / "run"), loss_plot=False))


def test_encoders_build_the_cache_before_the_uvit_is_placed(tmp_path, monkeypatch):
    """What the estimate's cache-building moment assumes: VQ model and text encoder placed, the cache encoded in
    cache_batches images at a time, then (only then) the U-ViT placed and LoRA attached."""
    from conftest import make_images

    from amused_tune.data import cache
    from amused_tune.model.bases import build_tiny
    from amused_tune.train import loop, setup

    comps = build_tiny()
    names = {id(comps.vqvae): "vq", id(comps.text_encoder): "text", id(comps.transformer): "uvit"}
    events = []
    place, prepare, encode = setup.place, loop.prepare_training_data, cache.encode_images
    monkeypatch.setattr(setup, "place", lambda m, *a: events.append(f"place {names[id(m)]}") or place(m, *a))
    monkeypatch.setattr(loop, "prepare_training_data",
                        lambda *a: events.append("prepare data") or prepare(*a))
    monkeypatch.setattr(cache, "encode_images", lambda vq, px: events.append(f"encode {len(px)}") or encode(vq, px))
    monkeypatch.setattr(memory, "CACHE_PIXELS", 2 * comps.resolution**2)  # 2 images at a time
    loop.train(tiny_cached_recipe(tmp_path, make_images(tmp_path / "data", n=5)), components=comps)
    assert events == ["place vq", "place text", "prepare data", "encode 2", "encode 2", "encode 1", "place uvit"]


def test_validation_grid_is_decoded_one_image_at_a_time_into_the_same_png_bytes(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from amused_tune.model.bases import build_tiny, decode_tokens
    from amused_tune.recipe import ModelConfig, OutputConfig, Recipe, ValidationConfig
    from amused_tune.train import validation

    comps = build_tiny()
    recipe = Recipe(model=ModelConfig(base="tiny"), output=OutputConfig(dir=str(tmp_path)),
                    validation=ValidationConfig(prompts=["a red square", "a blue disc"], images_per_prompt=2, steps=3))
    empty = tuple(t.detach() for t in validation.encode_prompts(comps.text_encoder, comps.tokenizer, [""]))
    validator = validation.Validator(recipe, comps, empty)
    drawn, batches = [], []
    sample = validation.sample_tokens
    monkeypatch.setattr(validation, "sample_tokens", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    monkeypatch.setattr(validation, "decode_tokens", lambda vq, t: batches.append(len(t)) or decode_tokens(vq, t))
    accelerator = Accelerator(cpu=True)
    one_by_one = validator(comps.transformer, 1, tmp_path / "one", accelerator).read_bytes()
    assert batches == [1, 1, 1, 1]

    whole = decode_tokens(comps.vqvae, drawn[0])  # the grid decoded in one batch, as the trainer did before
    rows = iter(range(4))
    monkeypatch.setattr(validation, "decode_tokens", lambda vq, t: whole[next(rows)][None])
    batched = validator(comps.transformer, 1, tmp_path / "all", accelerator).read_bytes()
    assert torch.equal(drawn[0], drawn[1])
    assert one_by_one == batched


def test_peak_memory_in_metrics_is_in_gb_of_10_to_the_9_bytes(monkeypatch):
    import resource
    import types

    from amused_tune.train import step

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=2_000_000))  # KiB
    assert step.peak_memory_gb() == pytest.approx(2.048)
