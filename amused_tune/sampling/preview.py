"""Pictures a person can see: the tiles of a validation grid scaled up and labelled with their prompts.

The small built-in bases generate 32 px images; a grid of them is a smudge on screen. `viewable_tiles` scales each
image up by a whole factor with nearest-neighbour (so every generated pixel stays a sharp square) until it is at
least `MIN_TILE` pixels, then writes its prompt on a dark band along its bottom edge, cut short with "..." where the
whole prompt does not fit. Real-size images (256 px and more) keep their size and only get the label.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256
PAD = 3


def upscale(image: Image.Image, min_size: int = MIN_TILE) -> Image.Image:
    """`image` in RGB (RGBA stays RGBA), scaled by the smallest whole factor that makes its short side >= min_size
    (nearest)."""
    image = image if image.mode == "RGBA" else image.convert("RGB")
    factor = math.ceil(min_size / min(image.size))
    if factor <= 1:
        return image.copy()
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def fitted(text: str, font, width: int) -> str | None:
    """`text`, or its longest start plus "..." that is at most `width` px wide; None when not even that fits."""
    if font.getlength(text) <= width:
        return text
    for end in range(len(text) - 1, 2, -1):
        short = text[:end].rstrip() + "..."
        if font.getlength(short) <= width:
            return short
    return None


def label(tile: Image.Image, text: str) -> Image.Image:
    """Write `text` in white on a dark band along the bottom of `tile` (in place), where it fits."""
    font = ImageFont.load_default(size=max(11, tile.width // 22))
    line = fitted(" ".join(text.split()), font, tile.width - 2 * PAD)
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
    band = bottom - top + 2 * PAD
    if line is None or band * 4 > tile.height:
        return tile
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, tile.height - band, tile.width, tile.height), fill=(20, 20, 20))
    draw.text((PAD, tile.height - band + PAD - top), line, fill=(255, 255, 255), font=font)
    return tile


def viewable_tiles(images: list[Image.Image], labels: list[str], min_size: int = MIN_TILE) -> list[Image.Image]:
    """The tiles of a grid: each image scaled up to >= min_size px (nearest) and labelled with its prompt."""
    return [label(upscale(image, min_size), text) for image, text in zip(images, labels)]
