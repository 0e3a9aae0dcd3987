"""Does turning samples into sprites help? The toy base's samples with and without `--pixel-grid 8 --palette`.

The toy world is pixel art on an 8 x 8 grid of 4 px cells in nine colours, so its samples can go through the same
post-processing as any pixel-art sample (`amused_tune.sampling.pixel_art.pixelate`: one flat cell per grid cell,
every pixel named by its nearest palette colour, the cell takes the colour most of its pixels have) and be measured
by the world's exact classifier: the clean share (no stray cell, `classify.is_clean`) and the caption match
(shape, colour and background as asked), before and after; and the share that is real pixel art (every cell flat,
every colour one of the toy's).

    python bench/pixel_art.py                   # the numbers and pictures in docs/pixel_art.md
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amused_tune.sampling.pixel_art import pixelate
from amused_tune.toy import world
from amused_tune.toy.classify import classify, is_clean
from amused_tune.toy.evaluate import eval_prompts

TOY_COLOURS = [world.PALETTE[name] for name in world.PALETTE]  # the toy's nine colours


def write_palette(path: str | Path) -> Path:
    """The toy's colours as a Lospec-style .hex file (one RRGGBB per line)."""
    path = Path(path)
    path.write_text("".join("{:02X}{:02X}{:02X}\n".format(*c) for c in TOY_COLOURS))
    return path


def as_sprite(image: Image.Image) -> Image.Image:
    """A toy sample through `--pixel-grid 8 --palette <the toy's colours>`, enlarged back to 32 px (nearest)."""
    sprite = pixelate(image, world.GRID, TOY_COLOURS)
    return sprite.resize((world.SIZE, world.SIZE), Image.Resampling.NEAREST)


def is_pixel_exact(image: Image.Image) -> bool:
    """Whether every 4 x 4 cell is one flat colour and every colour is one of the toy's (real pixel art)."""
    a = np.asarray(image.convert("RGB")).reshape(world.GRID, world.CELL, world.GRID, world.CELL, 3)
    flat = (a == a[:, :1, :, :1]).all()
    return bool(flat and {tuple(c) for c in a.reshape(-1, 3)} <= set(TOY_COLOURS))


def rates(images: list[Image.Image], prompts: list[str]) -> dict:
    """clean (no stray cell), match (the caption's shape, colour and background), exact (flat cells in the toy's
    colours): shares of `images`."""
    found = [classify(im) for im in images]
    n = max(len(images), 1)
    return {"clean": sum(is_clean(im, f) for im, f in zip(images, found)) / n,
            "match": sum(f.matches(p) for f, p in zip(found, prompts)) / n,
            "exact": sum(is_pixel_exact(im) for im in images) / n}


@torch.no_grad()
def compare(components, n_prompts: int = 50, seeds=(0, 1), **sampling) -> dict:
    """Sample `n_prompts` world captions x `seeds` with the kit's sampler (`sampling`: steps, guidance, min_p...),
    and measure the samples as drawn ("raw") and as sprites ("sprite")."""
    from amused_tune.sampling.sampler import generate, to_pil

    prompts = eval_prompts(n_prompts)
    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    _, images = generate(components, all_prompts, all_seeds, **sampling)
    raw = to_pil(images)
    sprites = [as_sprite(im) for im in raw]
    changed = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(raw, sprites))
    return {"raw": rates(raw, all_prompts), "sprite": rates(sprites, all_prompts), "samples": len(raw),
            "changed_by_the_grid": changed, "images": raw, "sprites": sprites, "prompts": all_prompts}
