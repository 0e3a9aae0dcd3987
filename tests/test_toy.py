"""The toy pretrained aMUSEd: its world, its exact classifier, and whether it draws what it is asked."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from toyworld_helpers import classify, eval_prompts, match_rate, toy_components

from amused_tune.models import encode_prompts, load_components
from amused_tune.toy import toy_dir, world
from amused_tune.toy.classify import MIN_IOU

MATCH_THRESHOLD = 0.90  # issue 8: shape and colours match the caption in >= 90% of samples


# --------------------------------------------------------------------------------------------- world


def test_world_is_deterministic_and_captions_round_trip():
    a, b = world.sample_specs(3, seed=7), world.sample_specs(3, seed=7)
    assert a == b and a != world.sample_specs(3, seed=8)
    assert len(a) == 3 * len(world.all_triples()) == 3 * 90
    assert np.array_equal(np.asarray(world.render(a[0])), np.asarray(world.render(b[0])))
    spec = world.ShapeSpec("triangle", "yellow", "black")
    assert world.caption(spec) == "a yellow triangle on a black background"
    assert world.parse_caption(world.caption(spec)) == ("triangle", "yellow", "black")
    with pytest.raises(ValueError):
        world.parse_caption("a cat")


def test_imagefolder_is_what_the_kit_reads(tmp_path):
    from amused_tune.data.datasets import build_dataset
    from amused_tune.recipe import DataConfig

    specs = world.sample_specs(1, seed=0)[:5]
    folder = world.write_imagefolder(tmp_path / "w", specs)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [world.caption(s) for s in specs]
    ds = build_dataset(DataConfig(source="imagefolder", path=str(folder)), 32)
    item = ds[0]
    assert item["pixels"].shape == (3, 32, 32) and item["prompt"] == world.caption(specs[0])
    assert classify(item["pixels"]).matches(item["prompt"])


# --------------------------------------------------------------------------------------------- classifier


def test_classifier_is_exact_on_every_kind_of_world_image():
    colours = tuple(world.PALETTE)  # the held-out colours too: fine-tuning checks classify them
    specs = world.sample_specs(2, seed=3, colours=colours)
    found = [classify(world.render(s)) for s in specs]
    wrong = [(s, f) for s, f in zip(specs, found) if not f.matches(world.caption(s))]
    assert not wrong, wrong[:3]
    assert min(f.iou for f in found) > 0.9


def test_classifier_accepts_arrays_and_tensors_and_rejects_non_shapes():
    img = world.render(world.ShapeSpec("square", "red", "white", 15.0, 17.0, 8.0))
    arr = np.array(img)
    ten = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert classify(img) == classify(arr) == classify(ten)
    assert classify(img).shape == "square"
    blank = np.full((32, 32, 3), 245, dtype=np.uint8)
    assert classify(blank).shape == "unknown"
    rng = np.random.default_rng(0)
    noise = np.where(rng.random((32, 32, 1)) < 0.5, (220, 30, 30), (30, 60, 220)).astype(np.uint8)
    noise[:2], noise[-2:], noise[:, :2], noise[:, -2:] = (30, 60, 220), (30, 60, 220), (30, 60, 220), (30, 60, 220)
    assert classify(noise).shape == "unknown"
    two = np.asarray(world.render(world.ShapeSpec("circle", "red", "blue", 10.0, 10.0, 6.0))).copy()
    two[16:28, 16:28] = world.PALETTE["red"]  # a second shape: the blob's area/centroid no longer fit one shape
    assert classify(two).iou < classify(world.render(world.ShapeSpec("circle", "red", "blue", 10.0, 10.0, 6.0))).iou
    assert MIN_IOU > 0.5


# --------------------------------------------------------------------------------------------- the toy base


@pytest.fixture(scope="module")
def toy():
    return toy_components()


def test_toy_loads_offline_and_is_consistent(toy):
    assert load_components("toy").transformer.config == toy.transformer.config
    t, vq = toy.transformer.config, toy.vqvae.config
    assert t.codebook_size == vq.num_vq_embeddings
    assert toy.mask_id == t.vocab_size - 1 == t.codebook_size
    assert t.encoder_hidden_size == toy.text_encoder.config.hidden_size
    assert t.cond_embed_dim == toy.text_encoder.config.projection_dim
    assert t.micro_cond_embed_dim == 5 * t.micro_cond_encode_dim
    assert vq.lookup_from_codebook and not vq.mid_block_add_attention
    assert toy.resolution == world.SIZE and toy.transformer.config.sample_size == world.SIZE // 4
    size = sum(f.stat().st_size for f in toy_dir().rglob("*") if f.is_file())
    assert size < 16 * 2**20, f"toy weights are {size / 2**20:.1f} MiB"
    assert not list(toy_dir().rglob("*.bin")), "weights are committed as safetensors"


def test_vq_round_trip_keeps_what_the_classifier_reads(toy):
    from amused_tune.models import decode_tokens, encode_images

    specs = world.sample_specs(4, seed=11)
    pixels = torch.from_numpy(world.to_array([world.render(s) for s in specs]))
    rec = decode_tokens(toy.vqvae, encode_images(toy.vqvae, pixels))
    hits = [classify(r).matches(world.caption(s)) for r, s in zip(rec, specs)]
    assert sum(hits) / len(hits) >= 0.9  # measured 0.944 at build time


def test_vq_gives_a_patch_one_code_whatever_its_context(toy):
    """A uniform patch of a colour gets few codes whatever the image (shipped VQ: the most common code covers
    about half or more of a colour's patches; a plainly trained VQ: <= 27%, spread over 17-37 codes)."""
    from amused_tune.models import encode_images

    specs = world.sample_specs(2, seed=5)
    pixels = torch.from_numpy(world.to_array([world.render(s) for s in specs]))
    tokens = encode_images(toy.vqvae, pixels)
    patches = (pixels * 255).round().unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(4)
    uniform = (patches.amax(-1) - patches.amin(-1)).amax(-1) == 0  # [B, 8, 8]: one colour in the 4x4 patch
    colour = patches[..., 0]  # [B, 8, 8, 3]
    for name in world.WORLD_COLOURS:
        sel = uniform & (colour == torch.tensor(world.PALETTE[name], dtype=colour.dtype)).all(-1)
        codes = tokens[sel]
        top = torch.bincount(codes).max().item() / len(codes)
        assert top >= 0.4, f"uniform {name} patches: the most common code covers only {top:.0%}"


def test_captions_are_distinguishable_to_the_text_encoder(toy):
    captions = world.all_captions() + [""]
    hidden, pooled = encode_prompts(toy.text_encoder, toy.tokenizer, captions)
    flat = torch.nn.functional.normalize(hidden.flatten(1), dim=1)
    sim = flat @ flat.T - 2 * torch.eye(len(captions))
    assert sim.max() < 0.9999, "two captions encode (almost) identically"


_RATES: dict[float, object] = {}


def _match(toy, guidance: float):
    """50 prompts x 2 seeds at 12 steps, sampled once per guidance scale and shared by the tests below."""
    if guidance not in _RATES:
        _RATES[guidance] = match_rate(toy, eval_prompts(50), seeds=(0, 1), steps=12, guidance=guidance)
    return _RATES[guidance]


NOT_MET = ("issue 8 acceptance not met yet: the shipped toy draws the right background/colours but at guidance "
           "10 the samples break up (see docs/toy.md, 'Measured' and 'What did not work')")


@pytest.mark.xfail(reason=NOT_MET, strict=True)  # fails loudly once the toy meets the bar: then drop this
def test_toy_draws_what_it_is_asked(toy):
    """Issue 8 acceptance: 50 prompts x 2 seeds, 12 steps, guidance 10, >= 90% caption match."""
    result = _match(toy, 10.0)
    print(f"caption match {result.rate:.3f}: {result.summary()}")
    misses = [(p, f) for p, f in zip(result.prompts, result.found) if not f.matches(p)]
    assert len(result.found) == 100
    assert result.rate >= MATCH_THRESHOLD, misses[:5]


def test_toy_draws_the_caption_without_guidance(toy):
    """A floor under what the shipped toy does today (guidance 1: 0.53 at build time), against regressions of the
    base, the sampler or the classifier."""
    assert _match(toy, 1.0).rate >= 0.4


@pytest.mark.xfail(reason=NOT_MET, strict=True)  # fails loudly once the toy meets the bar: then drop this
def test_guidance_sweep(toy):
    """Caption-match rate per guidance scale (printed: run pytest -s to see it)."""
    rates = {g: _match(toy, g).rate for g in (1.0, 3.0, 5.0, 10.0)}
    print("guidance sweep (caption match):", {g: round(r, 3) for g, r in rates.items()})
    assert rates[10.0] >= MATCH_THRESHOLD
    assert rates[10.0] >= rates[1.0]


def test_held_out_colours_are_not_drawn_by_the_base(toy):
    """The base never saw purple/orange: fine-tuning checks start from a base that cannot draw them.
    (Its VQ never saw them either: see docs/toy.md before building a fine-tuning check on them.)"""
    prompts = [world.caption(world.ShapeSpec(s, c, b)) for s, c, b in random.Random(0).sample(
        [t for t in world.all_triples(world.WORLD_COLOURS + world.HELD_OUT_COLOURS)
         if t[1] in world.HELD_OUT_COLOURS and t[2] in world.WORLD_COLOURS], 10)]
    result = match_rate(toy, prompts, seeds=(0, 1), steps=12, guidance=1.0)
    assert result.colour_rate <= 0.2
