"""Pixel art in the training data: recognise it, find its native grid, enlarge it by a whole factor.

Resized like a photo (bicubic), a 32x32 sprite at 256 px becomes soft edges and in-between colours, and the adapter
learns those. `data.pixel_art` decides per image (after transparency is laid over `data.background`):

- ``auto`` (the default): an image is pixel art when it is made of flat k x k blocks (k >= 2, on a grid that starts
  at its top-left corner, with colour changes both across and down) of at most `MAX_COLOURS` colours, as a sprite
  enlarged with nearest-neighbour is; or when it is small (at most `SMALL_SIDE` px a side) with at most
  `SMALL_COLOURS` colours and flat areas (at least `MIN_FLAT` of its 2x2 windows one colour), as a sprite at 1x is.
- ``true``: every image (an image with no blocks has a grid of 1 px);
- ``false``: none (every image is resized as before).

Pixel art is reduced to one pixel per block (its native grid), enlarged by the largest whole factor f at which
its short side fits the resolution (nearest-neighbour), then cropped where it is larger (at a multiple of f, so no
art pixel is cut) and padded with `data.background` where it is smaller (centred): no pixel is resampled.
Pixel art whose native short side is above the resolution is resized as a photo.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor

MAX_COLOURS = 256  # flat blocks of more colours: a photo enlarged with nearest-neighbour, not pixel art
SMALL_SIDE = 128
SMALL_COLOURS = 64
MIN_FLAT = 0.3
PALETTE_SIZE = 256  # `--palette data`: at most this many colours of the training set, the most used first


@dataclass(frozen=True)
class Grid:
    """What was found in one image: `cell` pixels per art pixel, the native size in art pixels, its colours."""

    cell: int
    width: int
    height: int
    colours: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


def parse_colour(text: str, key: str = "data.background") -> tuple[int, int, int]:
    """(r, g, b) of "#203040", "203040" or a colour name; ValueError with a one-line reason."""
    value = str(text).strip()
    if len(value) in (3, 6) and all(c in "0123456789abcdefABCDEF" for c in value):
        value = "#" + value
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a colour: give #RRGGBB, e.g. \"#203040\", or a name such as white") from None


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


def _changes(a: np.ndarray, axis: int) -> np.ndarray:
    """Positions p (1..n-1) along `axis` where line p differs from line p-1 anywhere."""
    other = 0 if axis == 1 else 1
    diff = np.diff(a, axis=axis) != 0
    return np.flatnonzero(diff.any(axis=(other, 2))) + 1


def count_colours(a: np.ndarray) -> int:
    flat = a.reshape(-1, a.shape[-1])
    packed = np.zeros(len(flat), dtype=np.int64)
    for c in range(flat.shape[1]):
        packed = packed * 256 + flat[:, c]
    return len(np.unique(packed))


def flat_share(a: np.ndarray) -> float:
    """Share of the 2x2 windows of `a` that are one colour."""
    if min(a.shape[:2]) < 2:
        return 1.0
    tl = a[:-1, :-1]
    same = (tl == a[1:, :-1]).all(-1) & (tl == a[:-1, 1:]).all(-1) & (tl == a[1:, 1:]).all(-1)
    return float(same.mean())


def find_grid(image: Image.Image, force: bool = False) -> Grid | None:
    """The native grid of an RGB image when it is pixel art (the module's rules), else None; `force`: always a grid
    (its flat blocks, else 1 px)."""
    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    xs, ys = _changes(a, 1), _changes(a, 0)
    cell = int(np.gcd.reduce(np.concatenate([xs, ys]))) if len(xs) + len(ys) else 1
    if cell >= 2 and (len(xs) and len(ys) or force):
        native = a[::cell, ::cell]
        colours = count_colours(native)
        if colours <= MAX_COLOURS or force:
            return Grid(cell, native.shape[1], native.shape[0], colours)
    colours = count_colours(a) if force or max(h, w) <= SMALL_SIDE else MAX_COLOURS + 1
    if force or (max(h, w) <= SMALL_SIDE and colours <= SMALL_COLOURS and flat_share(a) >= MIN_FLAT):
        return Grid(1, w, h, colours)
    return None


def grid_for(image: Image.Image, setting) -> Grid | None:
    """The grid `data.pixel_art` (auto, true or false) gives an image: None means a photo."""
    if setting is False or setting == "false":
        return None
    return find_grid(image, force=setting is True or setting == "true")


def native(image: Image.Image, grid: Grid) -> Image.Image:
    """One pixel per block: the top-left pixel of each cell (a partial cell at the right or bottom edge included)."""
    return Image.fromarray(np.asarray(image.convert("RGB"))[:: grid.cell, :: grid.cell].copy(), "RGB")


def factor(grid: Grid, resolution: int) -> int:
    """The whole factor the native image is enlarged by (0: its short side is above the resolution)."""
    return resolution // min(grid.width, grid.height)


def _offset(extra: int, step: int, rng: random.Random | None) -> int:
    """Crop offset into `extra` surplus pixels at a multiple of `step` (centre, or random from `rng`)."""
    steps = extra // step
    return step * (steps // 2 if rng is None else rng.randint(0, steps)) if steps else extra // 2


def enlarge(image: Image.Image, grid: Grid, resolution: int, background=(255, 255, 255),
            rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """(resolution x resolution RGB image, (enlarged width, enlarged height, crop top, crop left)): the native image
    enlarged by `factor` with nearest-neighbour, cropped where it is larger than the resolution (centre, or random
    from `rng`) and padded with `background` where it is smaller (centred)."""
    f = factor(grid, resolution)
    if f < 1:
        raise ValueError(f"a {grid.name} grid does not fit {resolution} px by a whole factor")
    small = native(image, grid)
    big = small.resize((small.width * f, small.height * f), Image.Resampling.NEAREST)
    left = _offset(big.width - resolution, f, rng) if big.width > resolution else 0
    top = _offset(big.height - resolution, f, rng) if big.height > resolution else 0
    crop = big.crop((left, top, min(big.width, left + resolution), min(big.height, top + resolution)))
    canvas = Image.new("RGB", (resolution, resolution), tuple(background))
    canvas.paste(crop, ((resolution - crop.width) // 2, (resolution - crop.height) // 2))
    return canvas, (big.width, big.height, top, left)


def native_colours(image: Image.Image, grid: Grid) -> Counter:
    """Colour ("#rrggbb") -> how many art pixels have it."""
    a = np.asarray(native(image, grid)).reshape(-1, 3)
    values, counts = np.unique(a, axis=0, return_counts=True)
    return Counter({hex_colour(v): int(n) for v, n in zip(values, counts)})


def palette_of(colours: dict) -> list[str]:
    """The training set's palette: its colours, the most used first, at most `PALETTE_SIZE`."""
    ranked = sorted(colours.items(), key=lambda kv: (-kv[1], kv[0]))
    return [c for c, _ in ranked[:PALETTE_SIZE]]


def merge_reports(parts: list[dict]) -> dict:
    """The `pixel_art` entry of several sources' data reports (data.sources) as one."""
    grids = Counter()
    for part in parts:
        grids.update(part["grids"])
    palette = list(dict.fromkeys(c for part in parts for c in part["palette"]))[:PALETTE_SIZE]
    return {"images": sum(p["images"] for p in parts), "photos": sum(p["photos"] for p in parts),
            "grids": dict(grids), "palette": palette}


def summary_line(grids: dict, used: int, setting, background: str) -> str:
    """The one line a run says at its start about the pixel art it found."""
    n = sum(grids.values())
    shown = ", ".join(f"{name}: {k}" for name, k in sorted(grids.items(), key=lambda kv: -kv[1])[:4])
    more = ", ..." if len(grids) > 4 else ""
    photos = used - n
    return (f"data: pixel art in {n} of {used} images (native grids {shown}{more}), enlarged by whole factors with "
            f"nearest-neighbour, transparency on {background}; {photos} resized as photos "
            f"(data.pixel_art={str(setting).lower()})")

