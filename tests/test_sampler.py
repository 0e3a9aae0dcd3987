"""The kit's MaskGIT sampler: diffusers parity, batch independence, variation, inpainting, adapters, CLI, bench."""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_with_random_lora
from PIL import Image

from amused_tune.cli import sample as sample_cli
from amused_tune.model.bases import build_tiny, decode_tokens, encode_images
from amused_tune.sampling.sampler import (
    SampleError,
    StyleDropGuidance,
    adapters_disabled,
    empty_prompt_embeds,
    generate,
    mask_to_grid,
    save_grid,
    start_step,
    step_plan,
    truncate,
)
from amused_tune.model.sampling_defaults import SamplingDefaultsError, describe_taken, resolve_sampling, sampling_defaults

ROOT = Path(__file__).resolve().parents[1]
MASK_ID = 64  # tiny model: codebook 64, mask id = vocab_size - 1


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def first_inputs(transformer: torch.nn.Module) -> tuple[list[torch.Tensor], object]:
    """Record the token grids the U-ViT is called with."""
    seen: list[torch.Tensor] = []
    handle = transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen, handle


def an_image(tiny, seed: int = 0) -> torch.Tensor:
    """A [1, 3, 32, 32] image the VQ model can represent (decoded from random tokens)."""
    tokens = torch.randint(0, 64, (1, 8, 8), generator=torch.Generator().manual_seed(seed))
    return decode_tokens(tiny.vqvae, tokens)


# --------------------------------------------------------------------------------------------- parity


def test_default_text_to_image_matches_diffusers_pipeline(tiny):
    from diffusers import AmusedPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = AmusedPipeline(vqvae=tiny.vqvae, tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder,
                              transformer=tiny.transformer, scheduler=tiny.scheduler)
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed in [("a cat", 0), ("a red dog on grass", 7)]:
        ref = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent").images
        tokens, images = generate(tiny, [prompt], [seed])
        assert tokens.shape == (1, 8, 8) and images.shape == (1, 3, 32, 32)
        assert torch.equal(tokens, ref)
        assert 0.0 <= images.min() and images.max() <= 1.0
    ref = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="latent", guidance_scale=4.0,
               num_inference_steps=5, negative_prompt="blurry").images
    tokens, _ = generate(tiny, ["a cat"], [3], guidance=4.0, steps=5, negative_prompt="blurry")
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("draws", ["exact", "fast"])
def test_image_in_batch_equals_image_alone(tiny, draws):
    prompts, seeds = ["a cat", "a red dog on grass", "a cat"], [5, 6, 7]
    batch, _ = generate(tiny, prompts, seeds, draws=draws)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone, _ = generate(tiny, [prompt], [seed], draws=draws)
        assert torch.equal(batch[i], alone[0])
    assert not torch.equal(batch[0], batch[2])  # same prompt, other seed: another image
    assert int(batch.max()) < MASK_ID and int(batch.min()) >= 0


def test_schedule_plan_and_strength_steps():
    ratios, temps = step_plan(12)
    assert ratios[0] == pytest.approx(math.cos(math.pi / 24), abs=1e-6) and ratios[-1] < 1e-6
    assert temps[0] == 2.0 and temps[-1] == 0.0 and len(temps) == 12
    assert step_plan(4, "linear")[0] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert (start_step(12, 1.0), start_step(12, 0.0), start_step(12, 0.6), start_step(12, 0.01)) == (0, 12, 5, 11)


def test_truncation_drops_unlikely_codes_and_is_off_by_default():
    probs = torch.tensor([[0.70, 0.20, 0.06, 0.04]])
    assert truncate(probs) is probs and truncate(probs, 0.0, 4) is probs  # off: the distribution itself
    assert torch.allclose(truncate(probs, min_p=0.1), torch.tensor([[0.70, 0.20, 0.0, 0.0]]) / 0.9)
    assert torch.allclose(truncate(probs, top_k=1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(truncate(probs, min_p=0.05, top_k=3), torch.tensor([[0.70, 0.20, 0.06, 0.0]]) / 0.96)


@pytest.mark.parametrize("draws", ["exact", "fast"])
def test_truncated_sampling_draws_only_the_kept_codes(tiny, draws):
    """top_k=1 draws each token's most likely code: the same tokens whatever the seed; min_p=0 is the default."""
    default, _ = generate(tiny, ["a cat"], [0], draws=draws)
    assert torch.equal(generate(tiny, ["a cat"], [0], draws=draws, min_p=0.0, top_k=0)[0], default)
    greedy = [generate(tiny, ["a cat"], [seed], steps=1, guidance=1.0, draws=draws, top_k=1)[0] for seed in (0, 1)]
    assert torch.equal(greedy[0], greedy[1])
    with pytest.raises(SampleError, match="min_p must be in"):
        generate(tiny, ["a cat"], [0], min_p=1.5)
    with pytest.raises(SampleError, match="top_k must be an integer"):
        generate(tiny, ["a cat"], [0], top_k=-2)


# --------------------------------------------------------------------------------------------- variation, inpainting


def test_variation_strength_one_starts_all_masked(tiny):
    seen, handle = first_inputs(tiny.transformer)
    try:
        tokens, _ = generate(tiny, ["a cat"], [2], image=an_image(tiny), strength=1.0)
    finally:
        handle.remove()
    assert len(seen) == 12
    assert bool((seen[0] == MASK_ID).all())
    text_only, _ = generate(tiny, ["a cat"], [2])
    assert torch.equal(tokens, text_only)  # the input image had no say


def test_variation_strength_zero_returns_input_tokens(tiny):
    image = an_image(tiny)
    seen, handle = first_inputs(tiny.transformer)
    try:
        tokens, images = generate(tiny, ["a cat"], [2, 3], image=image, strength=0.0)
    finally:
        handle.remove()
    assert seen == []
    expected = encode_images(tiny.vqvae, image)
    assert torch.equal(tokens, expected.expand(2, -1, -1))
    assert images.shape == (2, 3, 32, 32)


def test_variation_partial_strength_masks_the_scheduled_share(tiny):
    image = an_image(tiny)
    expected = encode_images(tiny.vqvae, image)[0]
    seen, handle = first_inputs(tiny.transformer)
    try:
        generate(tiny, ["a cat"], [4], image=image, strength=0.5)
    finally:
        handle.remove()
    assert len(seen) == 6  # the last 6 of 12 steps
    start = seen[0][0]  # uncond half of the [uncond; cond] forward batch
    ratios, _ = step_plan(12)
    assert int((start == MASK_ID).sum()) == math.floor(64 * ratios[5])
    kept = start != MASK_ID
    assert torch.equal(start[kept], expected[kept])


def test_inpainting_keeps_every_unmasked_token(tiny):
    image = an_image(tiny, seed=1)
    original = encode_images(tiny.vqvae, image)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 4:14] = 1.0  # white = regenerate; touches token rows 2..4, cols 1..3
    region = mask_to_grid(mask, (8, 8))
    assert int(region.sum()) == 9 and bool(region[0, 2:5, 1:4].all())
    seen, handle = first_inputs(tiny.transformer)
    try:
        tokens, _ = generate(tiny, ["a cat"], [0, 1], image=image, mask=mask)
    finally:
        handle.remove()
    keep = ~region.expand(2, -1, -1)
    assert torch.equal(tokens[keep], original.expand(2, -1, -1)[keep])
    start = seen[0][:2]  # the forward batch is [uncond; cond]
    assert bool((start[~keep] == MASK_ID).all()) and not bool((start[keep] == MASK_ID).any())
    assert not torch.equal(tokens, original.expand(2, -1, -1))


def test_mask_image_file_maps_white_pixels_to_tokens(tmp_path):
    img = Image.new("L", (64, 64), 0)
    img.paste(255, (60, 0, 64, 4))  # top-right corner only
    img.save(tmp_path / "m.png")
    region = mask_to_grid(tmp_path / "m.png", (8, 8))
    assert region.shape == (1, 8, 8) and int(region.sum()) == 1 and bool(region[0, 0, 7])


# --------------------------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from amused_tune.model.adapters import save_lora

    comps = tiny_with_random_lora(seed=0)
    return save_lora(tmp_path_factory.mktemp("run") / "adapter", comps.transformer)


def test_lora_scale_and_styledrop_guidance(tiny, adapter_dir):
    from amused_tune.model.adapters import load_lora, merge_adapters

    base_tokens, _ = generate(tiny, ["a cat"], [0])
    zero = build_tiny()
    load_lora(zero.transformer, adapter_dir, scale=0.0)
    merge_adapters(zero.transformer)
    assert torch.equal(generate(zero, ["a cat"], [0])[0], base_tokens)

    styled = build_tiny()
    load_lora(styled.transformer, adapter_dir, scale=1.0)
    adapted, _ = generate(styled, ["a cat"], [0])
    assert not torch.equal(adapted, base_tokens)
    # the base pass really is the base model, and the adapter is back on afterwards
    ids = torch.full((1, 8, 8), MASK_ID)
    kw = dict(micro_conds=torch.tensor([[32.0, 32, 0, 0, 6]]), pooled_text_emb=torch.zeros(1, 32),
              encoder_hidden_states=torch.zeros(1, 77, 32))
    with torch.no_grad():
        with adapters_disabled(styled.transformer):
            assert torch.equal(styled.transformer(ids, **kw), tiny.transformer(ids, **kw))
        assert not torch.equal(styled.transformer(ids, **kw), tiny.transformer(ids, **kw))
    # lambdas 0, 0: logits = adapter's conditional logits = sampling without guidance
    no_cfg, _ = generate(styled, ["a cat"], [0], guidance=1.0)
    sd0, _ = generate(styled, ["a cat"], [0], styledrop=StyleDropGuidance(0.0, 0.0))
    assert torch.equal(sd0, no_cfg)
    sd, _ = generate(styled, ["a cat"], [0], styledrop=StyleDropGuidance(2.0, 5.0))
    assert not torch.equal(sd, sd0)


# --------------------------------------------------------------------------------------------- per-base defaults


def write_sampling(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sampling.json").write_text(text)
    return folder


def test_base_sampling_json_fills_only_what_is_not_given(tmp_path):
    base = str(write_sampling(tmp_path / "base", '{"guidance": 3, "steps": 4, "temperature": [1.5, 0.5]}'))
    assert sampling_defaults(base) == {"guidance": 3.0, "steps": 4, "temperature": (1.5, 0.5)}
    values, taken = resolve_sampling(base)
    assert values == {"guidance": 3.0, "guidance_schedule": "constant", "steps": 4, "temperature": (1.5, 0.5),
                      "min_p": 0.0, "top_k": 0}
    assert describe_taken(base, taken) == f"sampling defaults from {base}: guidance 3.0, steps 4, temperature 1.5 0.5"
    values, taken = resolve_sampling(base, guidance=5.0, guidance_schedule="cosine", steps=None, temperature=(2.0, 0.0))
    assert values == {"guidance": 5.0, "guidance_schedule": "cosine", "steps": 4, "temperature": (2.0, 0.0),
                      "min_p": 0.0, "top_k": 0}
    assert taken == {"steps": 4}
    # no file (or the tiny base): diffusers' defaults, nothing said
    assert resolve_sampling("tiny") == ({"guidance": 10.0, "guidance_schedule": "constant", "steps": 12,
                                         "temperature": (2.0, 0.0), "min_p": 0.0, "top_k": 0}, {})
    assert describe_taken("tiny", {}) is None


def test_toy_base_samples_with_guidance_on_by_default():
    values, taken = resolve_sampling("toy")
    assert taken["guidance"] > 1.0 and values["guidance"] == taken["guidance"]
    assert set(taken) <= {"guidance", "guidance_schedule", "steps", "temperature", "min_p", "top_k"}


@pytest.mark.parametrize("text, needle", [
    ('{"guidence": 3.0}', "unknown key 'guidence'; valid keys: guidance, guidance_schedule, steps, temperature, "
                          "min_p, top_k"),
    ('{"min_p": 1.0}', "min_p must be a number in [0, 1) (0: off), got 1.0"),
    ('{"top_k": -1}', "top_k must be an integer >= 0 (0: off), got -1"),
    ('{"steps": 0}', "steps must be an integer >= 1, got 0"),
    ('{"steps": 12.5}', "steps must be an integer >= 1, got 12.5"),
    ('{"guidance": "high"}', 'guidance must be a number >= 0, got "high"'),
    ('{"guidance": true}', "guidance must be a number >= 0, got true"),
    ('{"guidance_schedule": "warmup"}', "guidance_schedule must be one of constant, linear, cosine, ramp1"),
    ('{"temperature": [1.0]}', "temperature must be a number or [start, end], got [1.0]"),
    ('[3.0]', "must hold a JSON object"),
    ('{"guidance": 3.0,}', "not a readable JSON file"),
])
def test_bad_sampling_json_is_one_line_naming_the_file(tmp_path, text, needle):
    base = write_sampling(tmp_path / "base", text)
    with pytest.raises(SamplingDefaultsError) as err:
        resolve_sampling(str(base))
    message = str(err.value)
    assert needle in message and str(base / "sampling.json") in message and "\n" not in message


def test_hub_base_reads_sampling_json_from_the_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert sampling_defaults("someone/some-amused") == {}  # not cached: diffusers' defaults, no download
    repo = tmp_path / "models--someone--some-amused"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    write_sampling(repo / "snapshots" / "abc123", '{"guidance": 5.0}')
    assert sampling_defaults("someone/some-amused") == {"guidance": 5.0}
    assert resolve_sampling("someone/some-amused")[0]["steps"] == 12


# --------------------------------------------------------------------------------------------- files, CLI, bench


def test_empty_prompt_embeddings_are_cached_until_weights_change():
    comps = build_tiny()
    first = empty_prompt_embeds(comps)
    assert empty_prompt_embeds(comps) is first
    with torch.no_grad():
        comps.text_encoder.text_projection.weight.mul_(2.0)  # what an optimizer step does: in place
    again = empty_prompt_embeds(comps)
    assert again is not first and not torch.equal(again[1], first[1]) and torch.equal(again[0], first[0])


def test_small_model_samples_on_one_cpu_thread_then_restores_the_count(tiny):
    seen = []
    handle = tiny.transformer.register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate(tiny, ["a cat"], [0], steps=2)
        after = torch.get_num_threads()
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert seen == [1, 1] and after == 2


def test_save_grid_writes_prompts_and_seeds(tmp_path):
    images = torch.rand(3, 3, 32, 32)
    path = save_grid(images, tmp_path / "samples" / "step-5.png", {"prompts": ["a", "b", "c"], "seeds": [0, 1, 2]})
    img = Image.open(path)
    assert img.size == (64, 64)
    assert img.text["prompts"] == '["a", "b", "c"]' and img.text["seeds"] == "[0, 1, 2]"


def test_cli_writes_images_and_grid_byte_identically(tmp_path, adapter_dir):
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["--base", "tiny", "--prompt", "a cat", "--num-images", "2", "--seed", "1", "--out", str(out)]
        assert sample_cli.main(argv) == 0
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["000-seed1.png", "001-seed2.png", "grid.png"]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    meta = Image.open(outs[0] / "001-seed2.png").text
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["guidance"]) == ("a cat", "2", "12", "10.0")
    assert Image.open(outs[0] / "grid.png").size == (512, 256)  # 32 px images shown at 256 px (amused_tune.sampling.preview)

    out = tmp_path / "lora"
    argv = ["sample", "--base", "tiny", "--prompt", "a cat", "--out", str(out), "--adapter", str(adapter_dir),
            "--adapter-scale", "0.5", "--steps", "4"]
    assert sample_cli.main(argv) == 0
    assert '"scale": 0.5' in Image.open(out / "000-seed0.png").text["adapter"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny model as a pipeline folder whose sampling.json recommends guidance 2, ramp1, 3 steps."""
    folder = tmp_path_factory.mktemp("bases") / "tiny-with-defaults"
    build_tiny().save_pretrained(folder)
    return write_sampling(folder, '{"guidance": 2.0, "guidance_schedule": "ramp1", "steps": 3}')


def test_cli_takes_what_is_not_given_from_the_base_and_says_so(tmp_path, capsys, tiny_folder):
    argv = ["--base", str(tiny_folder), "--prompt", "a cat", "--out", str(tmp_path / "a")]
    assert sample_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"sampling defaults from {tiny_folder}: guidance 2.0, guidance_schedule ramp1, steps 3" in err
    meta = Image.open(tmp_path / "a" / "000-seed0.png").text
    assert (meta["steps"], meta["guidance"], meta["guidance_schedule"], meta["temperature"]) == (
        "3", "2.0", "ramp1", "[2.0, 0.0]")
    argv = ["--base", str(tiny_folder), "--prompt", "a cat", "--out", str(tmp_path / "b"), "--steps", "2",
            "--guidance", "4", "--guidance-schedule", "linear", "--temperature", "1", "0"]
    assert sample_cli.main(argv) == 0
    assert "sampling defaults" not in capsys.readouterr().err  # everything given: nothing taken from the base
    meta = Image.open(tmp_path / "b" / "000-seed0.png").text
    assert (meta["steps"], meta["guidance"], meta["guidance_schedule"], meta["temperature"]) == (
        "2", "4.0", "linear", "[1.0, 0.0]")


def test_cli_truncation_flags_reach_the_sampler_and_the_png(tmp_path):
    argv = ["--base", "tiny", "--prompt", "a cat", "--out", str(tmp_path), "--min-p", "0.2", "--top-k", "3"]
    assert sample_cli.main(argv) == 0
    meta = Image.open(tmp_path / "000-seed0.png").text
    assert (meta["min_p"], meta["top_k"]) == ("0.2", "3")


@pytest.mark.parametrize("key, value, needle", [
    ("min_p", 1.0, "validation.min_p must be in [0, 1) (0: off), got 1.0"),
    ("top_k", -1, "validation.top_k must be >= 0 (0: off), got -1"),
])
def test_recipe_refuses_out_of_range_truncation(key, value, needle):
    from amused_tune.recipe import Recipe, RecipeError, ValidationConfig

    with pytest.raises(RecipeError, match=re.escape(needle)):
        Recipe(validation=ValidationConfig(**{key: value})).resolve().validate()


def test_cli_toy_uses_its_own_defaults_with_guidance_on(tmp_path, capsys):
    assert sample_cli.main(["--base", "toy", "--prompt", "a red square on a blue background",
                            "--out", str(tmp_path)]) == 0
    assert "sampling defaults from toy: guidance" in capsys.readouterr().err
    assert float(Image.open(tmp_path / "000-seed0.png").text["guidance"]) > 1.0


def test_cli_bad_sampling_json_is_one_line_exit_2(tmp_path, capsys):
    base = tmp_path / "base"
    build_tiny().save_pretrained(base)
    write_sampling(base, '{"guidance": 3.0, "stpes": 12}')
    assert sample_cli.main(["--base", str(base), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"amused-tune sample: error: {base / 'sampling.json'}: unknown key 'stpes'")


def test_validation_grid_and_card_use_the_base_defaults(tmp_path, capsys, image_folder, tiny_folder):
    from amused_tune.recipe import AdapterConfig, DataConfig, ModelConfig, OutputConfig, Recipe, TrainConfig
    from amused_tune.recipe import ValidationConfig
    from amused_tune.train.loop import train

    recipe = Recipe(model=ModelConfig(base=str(tiny_folder)),
                    data=DataConfig(source="imagefolder", path=str(image_folder), cache=False),
                    adapter=AdapterConfig(kind="lora", rank=4), validation=ValidationConfig(prompts=["a cat"], every=5),
                    train=TrainConfig(batch_size=2, max_steps=1, precision="fp32"),
                    output=OutputConfig(dir=str(tmp_path / "run"), loss_plot=False))
    train(recipe, components=build_tiny())
    assert f"sampling defaults from {tiny_folder}: guidance 2.0, guidance_schedule ramp1, steps 3" in (
        capsys.readouterr().out)
    meta = Image.open(tmp_path / "run" / "samples" / "step-1.png").text
    assert (meta["steps"], meta["guidance"], meta["guidance_schedule"]) == ("3", "2.0", "ramp1")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "3 MaskGIT steps, guidance 2.0 (ramp1 schedule)" in card and "sampling defaults from" in card


@pytest.mark.parametrize("extra, needle", [
    (["--image", "missing.png"], "missing.png"),
    (["--mask", "m.png"], "--mask needs --image"),
    (["--quantize", "8bit", "--device", "cpu"], "CUDA"),
    (["--adapter", "nowhere/at/all"], "nowhere/at/all"),
    (["--min-p", "1.5"], "min_p must be in [0, 1) (0: off), got 1.5"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    rc = sample_cli.main(["--base", "tiny", "--prompt", "x", "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and needle in err[-1] and err[-1].startswith("amused-tune sample: error:")


def test_bench_runs_tiny_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_sample", ROOT / "bench" / "sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--steps", "2", "--batch-sizes", "1", "2", "--warmup", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| batch | diffusers s" in out and "| 2 |" in out


def test_default_draws_are_fast_on_cuda_and_exact_elsewhere(tiny):
    from amused_tune.sampling.sampler import resolve_draws

    assert resolve_draws("auto", torch.device("cuda", 0)) == "fast"
    assert resolve_draws("auto", torch.device("cpu")) == "exact"
    assert resolve_draws("exact", torch.device("cuda", 0)) == "exact"  # bit parity with diffusers when asked
    assert resolve_draws("fast", torch.device("cpu")) == "fast"
    with pytest.raises(SampleError, match="draws must be one of"):
        resolve_draws("quick", torch.device("cpu"))
    default, _ = generate(tiny, ["a cat"], [3], steps=4)  # on this CPU: the exact draws
    assert torch.equal(default, generate(tiny, ["a cat"], [3], steps=4, draws="exact")[0])
