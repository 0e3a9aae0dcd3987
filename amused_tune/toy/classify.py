"""An exact classifier of toy-world images: what shape, of what colour, on what background.

It is a measuring instrument, not a learned model: on images drawn by `world.render` it is right every time
(`tests/test_toy.py` checks all of them), so on samples of a model it measures whether the model drew what the
caption asked for.

1. background: the palette colour nearest to the median of the 2-pixel border (shapes never reach it);
2. shape colour: the palette colour nearest to the median of the pixels far from the background;
3. coverage: each pixel's fraction of shape colour, projected on the background -> shape colour line
   (antialiased edges give fractions);
4. shape: the largest connected blob of coverage > 0.5 (and its rim) gives an area and a centroid; each of
   circle, square and triangle of that area and centroid is drawn and compared with the coverage map (soft
   IoU, 1.0 for a perfect drawing); the best wins,
   and if even the best overlaps less than `MIN_IOU` the answer is ``"unknown"`` (a blob, noise, two shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from amused_tune.toy.world import PALETTE, SHAPES, SIZE, ShapeSpec, parse_caption, render

MIN_IOU = 0.75
_FAR = 60.0  # RGB distance beyond which a pixel is not background
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Classification:
    shape: str  # one of world.SHAPES, or "unknown"
    colour: str  # palette name, or "unknown" when no shape was found
    background: str
    iou: float  # overlap of the coverage map with the best-fitting ideal shape

    def matches(self, text: str) -> bool:
        """Whether this is what the caption `text` asks for (shape, colour and background)."""
        return (self.shape, self.colour, self.background) == parse_caption(text)


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


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(1)))]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return labels == best if best else np.zeros_like(mask)


def _ideal_coverage(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    spec = ShapeSpec(shape, "white", "black", cx, cy, r)
    return np.asarray(render(spec), dtype=np.float32)[..., 0].__sub__(15.0) / 230.0


def classify(image) -> Classification:
    """Name the shape, its colour and the background of one toy-world image (see the module docstring)."""
    px = _as_array(image)
    h, w, _ = px.shape
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3), px[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    far = np.linalg.norm(px - bg_rgb, axis=-1) > _FAR
    if far.sum() < 4:
        return Classification("unknown", "unknown", background, 0.0)
    colour = nearest_colour(np.median(px[far], axis=0))
    fg = _RGB[_NAMES.index(colour)]
    d = fg - bg_rgb
    coverage = np.clip(((px - bg_rgb) @ d) / max(float(d @ d), 1.0), 0.0, 1.0)
    blob = _largest_blob(coverage > 0.5)
    if blob.sum() < 4:
        return Classification("unknown", colour, background, 0.0)
    near = blob.copy()  # the blob and its antialiased rim
    near[1:] |= blob[:-1]
    near[:-1] |= blob[1:]
    near[:, 1:] |= blob[:, :-1]
    near[:, :-1] |= blob[:, 1:]
    cov = coverage * near
    area = float(cov.sum())
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    mx, my = float((cov * xx).sum() / area), float((cov * yy).sum() / area)
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:  # place each candidate by the blob's area and centroid, then compare
        r = float(np.sqrt(area / {"square": 4.0, "circle": np.pi, "triangle": 2.0}[shape]))
        cy = my - r / 3 if shape == "triangle" else my  # a triangle's centroid sits r/3 below its box centre
        ideal = _ideal_coverage(shape, mx, cy, r)
        iou = float(np.minimum(ideal, coverage).sum() / max(np.maximum(ideal, coverage).sum(), 1e-6))
        if iou > best_iou:
            best, best_iou = shape, iou
    if best_iou < MIN_IOU:
        best = "unknown"
    return Classification(best, colour, background, round(best_iou, 4))


def caption_match_rate(images, captions: list[str]) -> float:
    """Fraction of images that `classify` finds to be what their caption asks for."""
    hits = [classify(im).matches(c) for im, c in zip(images, captions, strict=True)]
    return sum(hits) / max(len(hits), 1)
