"""Colour augmentation (data.colour_variants): the colours a caption names are recoloured and renamed, the ones it
does not name (the style) are kept; a fixed set of copies, cached with their own captions; resume exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amused_tune.data import cache
from amused_tune.data.augment import DEFAULT_COLOURS, colour_copies, recolourings
from amused_tune.data.cards import DataError, resolve_config
from amused_tune.data.datasets import validated_dataset
from amused_tune.model.bases import build_tiny, encode_images
from amused_tune.data.preprocess import preprocess
from amused_tune.recipe import DataConfig
from conftest import reset_accelerate
from helpers import resumed_equals_straight
from helpers import recipe_for

RED, WHITE, GREY = (220, 30, 30), (245, 245, 245), (128, 128, 128)
TOY = {"red": RED, "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30), "white": WHITE,
       "black": (15, 15, 15), "grey": GREY}
CAPTION = "a red square on a white background in [v] style"


def framed(shape_rgb=RED, background=WHITE, size=32) -> Image.Image:
    """A grey frame (4 px) around a `background` field with a `shape_rgb` square in the middle."""
    a = np.full((size, size, 3), GREY, dtype=np.uint8)
    a[4:-4, 4:-4] = background
    a[12:20, 12:20] = shape_rgb
    return Image.fromarray(a, "RGB")


def colours_at(image: Image.Image) -> tuple:
    """(frame pixel, background pixel, shape pixel)."""
    a = np.asarray(image)
    return tuple(a[0, 0]), tuple(a[6, 6]), tuple(a[16, 16])


def test_named_colours_are_recoloured_and_renamed_the_unnamed_frame_is_kept():
    copies = recolourings(framed(), CAPTION, "style.png", 100, TOY)
    # red and white are named and shown: every one-to-one map onto the six non-grey colours but the identity
    assert len(copies) == 6 * 5 - 1
    assert len({c.mapping for c in copies}) == len(copies)
    for copy in copies:
        table = dict(copy.mapping)
        image = copy.image(framed())
        assert colours_at(image) == (GREY, TOY[table["white"]], TOY[table["red"]])
        assert copy.caption(CAPTION) == f"a {table['red']} square on a {table['white']} background in [v] style"
        assert "grey" not in table.values()  # a colour of the style is never a target


def test_the_set_is_fixed_by_the_file_name_and_a_swap_is_a_swap():
    first = recolourings(framed(), CAPTION, "data/style.png", 5, TOY)
    assert [c.mapping for c in first] == [c.mapping for c in recolourings(framed(), CAPTION, "moved/style.png", 5, TOY)]
    assert [c.mapping for c in first] != [c.mapping for c in recolourings(framed(), CAPTION, "other.png", 5, TOY)]
    swap = next(c for c in recolourings(framed(), CAPTION, "s.png", 100, TOY) if dict(c.mapping) == {"red": "white", "white": "red"})
    assert swap.caption("A Red square, red and white") == "A White square, white and red"
    assert colours_at(swap.image(framed())) == (GREY, RED, WHITE)


def test_a_colour_named_but_not_shown_keeps_its_word_and_no_colour_named_means_no_copies():
    copies = recolourings(framed(), "a blue square on a white background", "s.png", 100, TOY)
    assert {s for c in copies for s, _ in c.mapping} == {"white"}  # blue is not in the image: not mapped
    # targets: neither shown (red, grey) nor named elsewhere (blue): green, yellow, black
    assert sorted(dict(c.mapping)["white"] for c in copies) == ["black", "green", "yellow"]
    assert recolourings(framed(), "a mushroom in [V] style", "s.png", 8, TOY) == []
    assert colour_copies(framed(), "a mushroom", "s.png", DataConfig(colour_variants=8, colours=TOY))[0][2] == "a mushroom"


def test_shading_is_kept_with_the_default_vocabulary():
    a = np.asarray(framed(shape_rgb=(200, 40, 40)), dtype=np.int16).copy()
    a[12:16, 12:20] += 10  # a lighter half of the red square
    image = Image.fromarray(a.astype(np.uint8))
    (copy,) = [c for c in recolourings(image, "a red square on a white background", "s.png", 200)
               if dict(c.mapping) == {"red": "blue", "white": "yellow"}]
    out = np.asarray(copy.image(image), dtype=np.int16)
    shift = np.array(DEFAULT_COLOURS["blue"]) - np.array(DEFAULT_COLOURS["red"])
    assert (out[13, 13] - out[18, 18]).tolist() == [10, 10, 10]  # the shading difference survives
    assert out[18, 18].tolist() == np.clip(np.array([200, 40, 40]) + shift, 0, 255).tolist()
    assert tuple(out[0, 0]) == GREY


@pytest.mark.parametrize("data,fragment", [
    (dict(colour_variants=-1), "data.colour_variants must be >= 0"),
    (dict(colour_variants=2, colours={"red": [1, 2]}), "data.colours: red: [1, 2] is not"),
    (dict(colour_variants=2, colours={"red": [1, 2, 3]}), "at least two colours"),
])
def test_bad_values_are_one_line_errors(tmp_path, data, fragment):
    framed().save(tmp_path / "s.png")
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        resolve_config(DataConfig(source="single_image", path=str(tmp_path / "s.png"), prompt=CAPTION, **data))


def single(tmp_path: Path, **data) -> DataConfig:
    framed().save(tmp_path / "s.png")
    return resolve_config(DataConfig(source="single_image", path=str(tmp_path / "s.png"), prompt=CAPTION,
                                     cache_dir=str(tmp_path / "cache"), colours=TOY, **data))


def test_the_cache_holds_the_image_then_its_copies_with_their_captions_and_the_pixel_path_agrees(tmp_path):
    comps = build_tiny()
    cfg = single(tmp_path, colour_variants=3, random_flip=True)
    dataset, _, report = cache.cached_dataset(cfg, 32, comps, show_progress=False)
    assert (report.to_dict()["used"], report.to_dict()["recoloured_copies"]) == (1, 3)
    copies = recolourings(framed(), CAPTION, "s.png", 3, TOY)
    assert dataset.prompts == [CAPTION] + [c.caption(CAPTION) for c in copies]
    assert dataset.tokens.shape == (4, 2, 8, 8)  # 4 samples x (unflipped, flipped)
    pixels, _ = preprocess(copies[1].image(framed()), 32)
    assert (dataset.tokens[2, 0].long() == encode_images(comps.vqvae, pixels[None])[0]).all()
    plain, _, _ = cache.cached_dataset(single(tmp_path, random_flip=True), 32, comps, show_progress=False)
    assert plain.prompts == [CAPTION] and len(list((tmp_path / "cache").glob("tokens-*"))) == 2  # its own key
    pixel_set, pixel_report = validated_dataset(cfg, 32)
    assert pixel_report.copies == 3
    assert [p for _, p, _ in pixel_set.samples] == dataset.prompts
    item = pixel_set[(2, 0)]
    flipped = pixel_set.cfg.random_flip
    assert flipped and item["prompt"] == dataset.prompts[2]
    assert {tuple(item["pixels"][:, 16, 16].mul(255).round().int().tolist())} <= {TOY[dict(copies[1].mapping)["red"]]}


def test_resume_with_colour_variants_is_bit_exact(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    framed().save(data / "a.png")
    framed(shape_rgb=(30, 60, 220)).save(data / "b.png")
    rows = [{"file_name": "a.png", "text": CAPTION}, {"file_name": "b.png", "text": CAPTION.replace("red", "blue")}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(out, steps):
        r = recipe_for(out, data, max_steps=steps)
        r.data.cache, r.data.cache_dir, r.data.colour_variants, r.data.colours = True, str(tmp_path / "c"), 3, TOY
        return r

    reset_accelerate()
    resumed_equals_straight(tmp_path, recipe)
