"""The toy pretrained aMUSEd: its world, its exact classifier, and whether it draws what it is asked."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from helpers import toy_components
from PIL import Image

from amused_tune.model.bases import encode_images, encode_prompts, load_components
from amused_tune.toy import toy_dir, world
from amused_tune.toy.build import cell_ids
from amused_tune.toy.classify import classify, is_clean
from amused_tune.toy.evaluate import (_sampler_kwargs, clean_rate, eval_prompts, framed_prompts, held_out_prompts,
                                      match_rate, read_sampling_defaults)
from amused_tune.toy.text import build_toy_tokenizer, toy_words

MATCH_THRESHOLD = 0.90  # shape, colour and background match the caption in >= 90% of samples
CLEAN_THRESHOLD = 0.90  # samples with no stray cell at the toy's defaults
FRAMED_THRESHOLD = 0.80  # framed captions drawn with their shape, colour, background and frame
EVERY_COLOUR = tuple(c for c in world.PALETTE if c != world.STYLE_COLOUR)


def every_world_image() -> list[world.ShapeSpec]:
    """Every (shape, colour, background) over all eight colours, with and without the [v] style."""
    return world.world_specs(EVERY_COLOUR) + world.world_specs(EVERY_COLOUR, style=True)


def every_framed_image() -> list[world.ShapeSpec]:
    """Every (shape, colour, background) over all eight colours with a frame of each colour but the background."""
    return world.framed_specs(EVERY_COLOUR)


# --------------------------------------------------------------------------------------------- world


def test_world_is_grid_aligned_and_captions_round_trip():
    spec = world.ShapeSpec("triangle", "yellow", "black")
    img = np.asarray(world.render(spec))
    assert img.shape == (32, 32, 3)
    cells = img.reshape(8, 4, 8, 4, 3)
    assert (cells == cells[:, :1, :, :1]).all(), "every 4x4 cell is one flat colour"
    assert (world.cells(spec)[[0, 1, 6, 7]] == "black").all(), "the two outer rings are background"
    assert world.caption(spec) == "a yellow triangle on a black background"
    assert world.parse_caption(world.caption(spec)) == ("triangle", "yellow", "black")
    styled = world.ShapeSpec("triangle", "yellow", "black", style=True)
    assert world.caption(styled) == "a yellow triangle on a black background in [v] style"
    assert world.parse_caption(world.caption(styled)) == ("triangle", "yellow", "black")
    assert world.has_style(world.caption(styled)) and not world.has_style(world.caption(spec))
    assert len(world.world_specs()) == 90
    with pytest.raises(ValueError):
        world.parse_caption("a cat")


def test_frames_are_the_outer_ring_and_plain_captions_are_unchanged():
    framed = world.ShapeSpec("circle", "red", "blue", frame="green")
    assert world.caption(framed) == "a red circle on a blue background with a green frame"
    assert world.parse_caption(world.caption(framed)) == ("circle", "red", "blue")
    assert world.caption_frame(world.caption(framed)) == "green"
    assert world.caption_frame("a red circle on a blue background") is None
    assert world.caption_frame("a red circle on a blue background in [v] style") == "grey"
    grid, plain = world.cells(framed), world.cells(world.ShapeSpec("circle", "red", "blue"))
    ring = np.zeros((8, 8), dtype=bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    assert (grid[ring] == "green").all() and (grid[~ring] == plain[~ring]).all()
    assert (plain[ring] == "blue").all(), "a plain caption is drawn as before: no frame"
    assert len(world.framed_specs()) == 450 and all(s.frame != s.background for s in world.framed_specs())
    assert not {s.frame for s in world.framed_specs()} & {"grey", *world.HELD_OUT_COLOURS}, "grey stays unseen"
    for bad in (world.ShapeSpec("circle", "red", "blue", frame="blue"),
                world.ShapeSpec("circle", "red", "blue", style=True, frame="green")):
        with pytest.raises(ValueError):
            world.cells(bad)


def test_style_images_cover_every_shape_and_dark_light_saturated_backgrounds(tmp_path):
    from amused_tune.toy.__main__ import main

    examples = [(spec, world.caption(spec)) for spec in world.STYLE_IMAGES.values()]
    assert len(examples) >= 5 and (world.STYLE_EXAMPLE, world.caption(world.STYLE_EXAMPLE)) in examples
    assert all(spec.style and text.endswith(" in [v] style") for spec, text in examples)
    assert {spec.shape for spec, _ in examples} == set(world.SHAPES)
    backgrounds = {spec.background for spec, _ in examples}
    assert {"black", "white"} <= backgrounds and backgrounds & {"red", "green", "blue"}
    assert len({(s.shape, s.colour, s.background) for s, _ in examples}) == len(examples), "different content"
    assert main(["sets", "--root", str(tmp_path)]) == 0
    captions = json.loads((tmp_path / "assets" / "styledrop_toy" / "captions.json").read_text())
    for name, spec in world.STYLE_IMAGES.items():
        found = classify(Image.open(tmp_path / "assets" / "styledrop_toy" / f"{name}.png"))
        assert found.matches_with_style(captions[f"{name}.png"]) and found.frame == "grey"


def test_imagefolder_is_what_the_kit_reads(tmp_path):
    from helpers import pixel_dataset
    from amused_tune.recipe import DataConfig

    specs = world.world_specs()[:5]
    folder = world.write_imagefolder(tmp_path / "w", specs)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [world.caption(s) for s in specs]
    ds = pixel_dataset(DataConfig(source="imagefolder", path=str(folder)), 32)
    item = ds[0]
    assert item["pixels"].shape == (3, 32, 32) and item["prompt"] == world.caption(specs[0])
    assert classify(item["pixels"]).matches(item["prompt"])


def test_new_concept_set_leaves_out_the_combinations_the_eval_asks_for():
    train, held = world.concept_split()
    assert len(train) == 12 and len(held) == 6 and not set(train) & set(held)
    assert {s.shape for s in held} == set(world.SHAPES)
    assert len(world.concept_finetune_specs()) <= 16


# --------------------------------------------------------------------------------------------- classifier


def test_classifier_is_exact_on_every_world_image():
    specs = every_world_image() + every_framed_image()
    images = [world.render(s) for s in specs]
    found = [classify(im) for im in images]
    wrong = [(s, f) for s, f in zip(specs, found)
             if not (f.matches_with_style(world.caption(s)) and f.matches_with_frame(world.caption(s)))]
    assert len(specs) == 336 + 1176 and not wrong, wrong[:3]
    assert min(f.iou for f in found) == 1.0
    assert all(is_clean(im, f) for im, f in zip(images, found)) and clean_rate(images[:20]) == 1.0


def test_one_stray_cell_makes_a_sample_unclean():
    arr = np.array(world.render(world.ShapeSpec("circle", "red", "blue", frame="green")))
    assert is_clean(arr)
    stray = arr.copy()
    stray[4:8, 12:16] = world.PALETTE["yellow"]  # one background cell of the second ring
    assert classify(stray).matches("a red circle on a blue background") and not is_clean(stray)
    corner = arr.copy()
    corner[0:4, 0:4] = world.PALETTE["blue"]  # one frame cell
    assert classify(corner).frame == "green" and not is_clean(corner)


def test_classifier_accepts_arrays_and_tensors_and_rejects_non_shapes():
    img = world.render(world.ShapeSpec("square", "red", "white"))
    arr = np.array(img)
    ten = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert classify(img) == classify(arr) == classify(ten)
    blank = np.full((32, 32, 3), 245, dtype=np.uint8)
    assert classify(blank).shape == "unknown"
    rng = np.random.default_rng(0)
    noise = np.where(rng.random((8, 8, 1)) < 0.5, (220, 30, 30), (30, 60, 220)).astype(np.uint8)
    noise[:2], noise[-2:], noise[:, :2], noise[:, -2:] = (30, 60, 220), (30, 60, 220), (30, 60, 220), (30, 60, 220)
    assert classify(noise.repeat(4, 0).repeat(4, 1)).shape == "unknown"
    one_off = arr.copy()
    one_off[8:12, 8:12] = world.PALETTE["white"]  # one cell missing from a 16-cell square still reads as a square
    assert classify(one_off).shape == "square" and classify(one_off).iou == 15 / 16


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
    assert toy.resolution == world.SIZE and toy.transformer.config.sample_size == world.GRID
    size = sum(f.stat().st_size for f in toy_dir().rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"toy weights are {size / 2**20:.1f} MiB"
    assert not list(toy_dir().rglob("*.bin")), "weights are committed as safetensors"


def test_toy_sampling_defaults_turn_guidance_on():
    saved = json.loads((toy_dir() / "sampling.json").read_text())
    assert set(saved) == {"guidance", "guidance_schedule", "steps", "temperature", "min_p", "top_k"}
    assert saved["guidance"] > 1.0 and saved["steps"] == 12 and len(saved["temperature"]) == 2
    assert 0 < saved["min_p"] < 1, "the toy truncates its draws (no stray cells)"
    read = read_sampling_defaults(toy_dir())
    assert {**read, "temperature": list(read["temperature"])} == saved


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_vq_round_trip_is_exact_on_every_colour_and_the_style(toy):
    from amused_tune.model.bases import decode_tokens

    specs = every_world_image() + every_framed_image()
    pixels = torch.from_numpy(world.to_array([world.render(s) for s in specs]))
    tokens = encode_images(toy.vqvae, pixels)
    assert torch.equal(tokens, torch.stack([cell_ids(s) for s in specs])), "one code per palette colour"
    rec = decode_tokens(toy.vqvae, tokens)
    assert all(classify(r).matches_with_style(world.caption(s)) for r, s in zip(rec, specs))
    assert all(classify(r).frame == s.ring for r, s in zip(rec, specs))


def test_toy_tokenizer_makes_each_word_one_token(toy):
    tok = build_toy_tokenizer()
    for word in toy_words():
        assert len(tok(word).input_ids) == 3, word  # <bos> word <eos>
    assert toy.tokenizer.get_vocab() == tok.get_vocab()


def test_captions_are_distinguishable_to_the_text_encoder(toy):
    captions = world.all_captions()
    hidden, _ = encode_prompts(toy.text_encoder, toy.tokenizer, captions)
    flat = torch.nn.functional.normalize(hidden.flatten(1), dim=1)
    sim = flat @ flat.T - 2 * torch.eye(len(captions))
    assert sim.max() < 0.999, "two captions encode (almost) identically"


_RATES: dict[float, object] = {}


def _match(toy, guidance: float):
    """50 prompts x 2 seeds at the toy's defaults, sampled once per guidance scale and shared by the tests below."""
    if guidance not in _RATES:
        d = read_sampling_defaults(toy_dir())
        _RATES[guidance] = match_rate(toy, eval_prompts(50), seeds=(0, 1), **_sampler_kwargs({**d, "guidance": guidance}))
    return _RATES[guidance]


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_toy_draws_what_it_is_asked_with_guidance_on(toy):
    """50 prompts x 2 seeds, 12 steps, the toy's default guidance (> 1): >= 90% caption match."""
    g = read_sampling_defaults(toy_dir())["guidance"]
    result = _match(toy, g)
    print(f"caption match at guidance {g}: {result.summary()}")
    misses = [(p, f) for p, f in zip(result.prompts, result.found) if not f.matches(p)]
    assert len(result.found) == 100
    assert result.rate >= MATCH_THRESHOLD, misses[:5]


def test_toy_samples_are_clean_at_its_defaults(toy):
    """The same 100 samples: >= 90% hold no stray cell (the toy's sampling.json truncates with min_p)."""
    result = _match(toy, read_sampling_defaults(toy_dir())["guidance"])
    print(f"clean samples at the defaults: {result.clean_rate:.3f}")
    assert result.clean_rate >= CLEAN_THRESHOLD


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_toy_draws_framed_captions(toy):
    """Pretraining drew frames in world colours: "... with a green frame" is drawn with its frame (30 x 2)."""
    d = read_sampling_defaults(toy_dir())
    result = match_rate(toy, framed_prompts(30), seeds=(0, 1), **_sampler_kwargs(d))
    print(f"framed captions: {result.framed_match:.3f} (frame {result.frame_rate:.3f})")
    assert result.framed_match >= FRAMED_THRESHOLD


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_guidance_helps(toy):
    g = read_sampling_defaults(toy_dir())["guidance"]
    assert _match(toy, g).rate >= _match(toy, 1.0).rate


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_held_out_colours_are_not_drawn_by_the_base(toy):
    """The U-ViT never saw purple/orange (its VQ did): fine-tuning checks start from a base that cannot draw them."""
    d = read_sampling_defaults(toy_dir())
    result = match_rate(toy, held_out_prompts(), seeds=(0, 1), steps=d["steps"], guidance=d["guidance"])
    assert result.rate < 0.10 and result.colour_rate < 0.10


def test_eight_toy_samples_take_under_five_seconds(toy):
    from amused_tune.sampling.sampler import generate

    d = read_sampling_defaults(toy_dir())
    t0 = time.perf_counter()
    generate(toy, ["a red circle on a blue background"], list(range(8)), steps=d["steps"], guidance=d["guidance"])
    assert time.perf_counter() - t0 < 5.0


def test_docs_give_every_palette_colours_rgb_and_an_image_drawn_from_them_is_read_right():
    """docs/toy.md lists each colour's RGB (what a user needs to draw a style image); a style image painted cell by
    cell from the documented values alone is read by the classifier as its caption says, frame included."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "toy.md").read_text()
    documented = {m[1]: tuple(int(v) for v in m[2].split(",")) for m in
                  re.finditer(r"^\| (\w+) \| \((\d+, \d+, \d+)\) \| `#[0-9a-f]{6}` \|", text, re.M)}
    assert documented == world.PALETTE
    cells = np.array([[documented["grey"] if r in (0, 7) or c in (0, 7) else documented["black"] for c in range(8)]
                      for r in range(8)], dtype=np.uint8)
    cells[2:6, 2:6] = documented["orange"]  # a square, drawn by hand from the table
    image = Image.fromarray(np.kron(cells, np.ones((4, 4, 1), dtype=np.uint8)))
    found = classify(image)
    assert found.matches_with_style("a orange square on a black background in [v] style")
    assert np.array_equal(np.asarray(image), np.asarray(world.render(world.ShapeSpec("square", "orange", "black",
                                                                                      style=True))))
