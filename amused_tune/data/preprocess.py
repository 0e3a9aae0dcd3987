"""Preprocessing: the prompt a caption becomes, and the resize (pixel art: the whole-factor enlargement), crop and
flip of an image with its micro-conditioning (original size and crop origin, as aMUSEd was trained)."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from amused_tune.data.captions import with_trigger
from amused_tune.data.pixel_art import Grid, enlarge, factor
from amused_tune.model.bases import micro_conditioning
from amused_tune.recipe import DataConfig


def item_draws(key, rng: random.Random) -> tuple[int, random.Random]:
    """(index, rng) of a dataset item. The trainer fetches items as (index, seed): the item's random crop, flip or
    cache variant then depends on that seed alone (its position in the run), so any `data.num_workers` and a resumed
    run draw exactly what an uninterrupted run does. A plain index draws from the dataset's own `rng`."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), random.Random(seed)
    return int(key), rng


def make_prompt(cfg: DataConfig, caption: str) -> str:
    """The training prompt of a caption: prefix + template, with `data.trigger_word` as its first tag."""
    return with_trigger(cfg.prompt_prefix + cfg.prompt_template.replace("{caption}", caption), cfg.trigger_word)


def crop_origin(width: int, height: int, resolution: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop top, crop left): short side to `resolution`, centre crop if no rng."""
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if rng is None:
        return new_w, new_h, (new_h - resolution) // 2, (new_w - resolution) // 2
    return new_w, new_h, rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)


def preprocess(image: Image.Image, resolution: int, rng: random.Random | None = None, flip: bool = False,
               grid: Grid | None = None, background=(255, 255, 255)) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the short side to `resolution`, crop a square (centre, or random from `rng`), optionally flip.
    Pixel art (`grid`, amused_tune.data.pixel_art) is enlarged by a whole factor with nearest-neighbour instead,
    cropped or padded with `background`.

    Returns (pixels [3, R, R] in [0, 1], micro_conds [5]): the image's true original size and the crop's top-left
    in the resized image, as aMUSEd was trained (pixel art: its enlarged size); a flipped crop reports its left
    edge in the flipped image.
    """
    if grid is not None and factor(grid, resolution) >= 1:
        image, (orig_w, orig_h, top, left) = enlarge(image, grid, resolution, background, rng)
        new_w = max(orig_w, resolution)
    else:
        orig_w, orig_h = image.size
        new_w, new_h, top, left = crop_origin(orig_w, orig_h, resolution, rng)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - resolution - left
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return pixels, micro_conditioning(orig_w, orig_h, top, left)
