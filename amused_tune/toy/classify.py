"""An exact classifier of toy-world images: what shape, of what colour, on what background, in what style.

It is a measuring instrument, not a learned model: on images drawn by `world.render` it is right every time
(`tests/test_toy.py` checks all of them), so on samples of a model it measures whether the model drew what the
caption asked for.

1. cells: each 4x4-pixel cell's median colour, named by the nearest palette colour;
2. background: the most common colour of the second ring of cells (shapes never reach it; the first ring may
   carry the style's frame);
3. frame: the most common colour of the outer ring when it covers at least `MIN_FRAME` of it and is not the
   background (None otherwise); style: the ``[v] style`` is drawn when at least `MIN_FRAME` of the outer ring is
   grey (whatever the background, as before frames were part of the world);
4. shape: the non-background cells of the inside (6x6 cells) are compared with every shape's template at every
   position (IoU on cells); the best wins, ``"unknown"`` below `MIN_IOU` (a blob, noise, two shapes). The shape
   colour is the most common colour of those cells.

`is_clean(image)`: the image is exactly (cell for cell) the world's rendering of what was read: no stray cell.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from amused_tune.toy.world import (
    CELL, GRID, PALETTE, STYLE_COLOUR, TEMPLATES, ShapeSpec, caption_frame, cells, has_style, parse_caption,
)

MIN_IOU = 0.85  # one cell off a 12-cell shape still counts (12/13 = 0.92), two cells do not
MIN_FRAME = 0.75
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
_RING0 = np.zeros((GRID, GRID), dtype=bool)
_RING0[0, :] = _RING0[-1, :] = _RING0[:, 0] = _RING0[:, -1] = True
_RING1 = np.zeros((GRID, GRID), dtype=bool)
_RING1[1:-1, 1:-1] = True
_RING1[2:-2, 2:-2] = False


@dataclass(frozen=True)
class Classification:
    shape: str  # one of world.SHAPES, or "unknown"
    colour: str  # palette name, or "unknown" when no shape was found
    background: str
    iou: float  # overlap (on cells) of the shape cells with the best-fitting template
    style: bool = False  # the [v] style's frame is drawn (>= MIN_FRAME of the outer ring grey)
    frame: str | None = None  # the outer ring's colour when it is a frame (not the background)
    row: int = 2  # top-left cell of the best-fitting template
    col: int = 2

    def matches(self, text: str) -> bool:
        """Whether this is what the caption `text` asks for (shape, colour and background; style not included)."""
        return (self.shape, self.colour, self.background) == parse_caption(text)

    def matches_with_style(self, text: str) -> bool:
        """`matches`, and the style is drawn exactly when the caption asks for it."""
        return self.matches(text) and self.style == has_style(text)

    def matches_with_frame(self, text: str) -> bool:
        """`matches`, and the frame is the one the caption asks for (grey for the style, none when not asked)."""
        return self.matches(text) and self.frame == caption_frame(text)


def _as_array(image) -> np.ndarray:
    """HxWx3 float32 in [0, 255] from a PIL image, an HxWx3 uint8 array or a 3xHxW float tensor/array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.max() <= 1.0 + 1e-6:
        arr = arr * 255.0
    return arr


def cell_colours(image) -> np.ndarray:
    """The 8x8 grid of palette names (each cell's median colour, nearest palette colour)."""
    px = _as_array(image)
    cellwise = px.reshape(GRID, CELL, GRID, CELL, 3).transpose(0, 2, 1, 3, 4).reshape(GRID, GRID, CELL * CELL, 3)
    med = np.median(cellwise, axis=2)  # [8, 8, 3]
    idx = ((med[:, :, None, :] - _RGB) ** 2).sum(-1).argmin(-1)
    return np.array(_NAMES, dtype=object)[idx]


def _best_template(shape_cells: np.ndarray) -> tuple[str, float, int, int]:
    best, best_iou, at = "unknown", 0.0, (2, 2)
    n = int(shape_cells.sum())
    for name, t in TEMPLATES.items():
        th, tw = t.shape
        for r in range(1, GRID - th):
            for c in range(1, GRID - tw):
                inter = int(shape_cells[r: r + th, c: c + tw][t].sum())
                iou = inter / (n + int(t.sum()) - inter)
                if iou > best_iou:
                    best, best_iou, at = name, iou, (r, c)
    return best, best_iou, *at


def classify(image) -> Classification:
    """Name the shape, its colour, the background and the style of one toy-world image (see the module docstring)."""
    grid = cell_colours(image)
    background = Counter(grid[_RING1]).most_common(1)[0][0]
    style = float((grid[_RING0] == STYLE_COLOUR).mean()) >= MIN_FRAME
    ring, count = Counter(grid[_RING0]).most_common(1)[0]
    frame = ring if count >= MIN_FRAME * _RING0.sum() and ring != background else None
    inside = np.zeros((GRID, GRID), dtype=bool)
    inside[1:-1, 1:-1] = True
    shape_cells = inside & (grid != background)
    if not shape_cells.any():
        return Classification("unknown", "unknown", background, 0.0, style, frame)
    colour = Counter(grid[shape_cells]).most_common(1)[0][0]
    shape, iou, row, col = _best_template(shape_cells)
    if iou < MIN_IOU:
        shape = "unknown"
    return Classification(shape, colour, background, round(iou, 4), style, frame, row, col)


def is_clean(image, found: Classification | None = None) -> bool:
    """Whether every cell of `image` is the cell of the world's rendering of what `classify` read from it (its
    shape at its position, colour, background and frame): no stray cell anywhere. An unknown shape is not clean."""
    found = found or classify(image)
    if found.shape == "unknown" or found.colour == found.background:
        return False
    spec = ShapeSpec(found.shape, found.colour, found.background, found.row, found.col, frame=found.frame)
    return bool((cell_colours(image) == cells(spec)).all())
