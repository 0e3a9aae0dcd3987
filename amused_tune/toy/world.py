"""The toy world: one flat shape on a flat background, 32x32 px, with a caption that says exactly what is drawn.

Everything is generated in code from a seed, so the world is the same on every machine:

    >>> spec = ShapeSpec("circle", "red", "blue", cx=16.0, cy=15.0, size=9.0)
    >>> caption(spec)
    'a red circle on a blue background'
    >>> img = render(spec)            # PIL.Image, RGB, 32x32

The pretrained toy base (`amused_tune.toy.build`) is trained on `sample_specs(...)` over `WORLD_COLOURS` and
`SHAPES`. `HELD_OUT_COLOURS` are never drawn during pretraining, so that fine-tuning on them (StyleDrop, full
fine-tuning) can be measured: the base cannot draw them before, the fine-tuned model must after.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: antialiased edges

# Colours far apart in RGB so that the classifier can name them exactly.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    # held out of pretraining (unseen colours for fine-tuning checks)
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
WORLD_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
HELD_OUT_COLOURS = ("purple", "orange")
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class ShapeSpec:
    """One image of the world: a shape of a colour on a background, centred at (cx, cy) with half-size `size`."""

    shape: str
    colour: str
    background: str
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    size: float = 9.0


def caption(spec: ShapeSpec) -> str:
    return f"a {spec.colour} {spec.shape} on a {spec.background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a caption written by `caption`."""
    words = text.strip().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a toy-world caption: {text!r}")
    return words[2], words[1], words[5]


def all_triples(colours: tuple[str, ...] = WORLD_COLOURS) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [(s, c, b) for s in SHAPES for c in colours for b in colours if c != b]


def all_captions(colours: tuple[str, ...] = WORLD_COLOURS) -> list[str]:
    return [caption(ShapeSpec(s, c, b)) for s, c, b in all_triples(colours)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # upright isosceles, base 2r, height 2r
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def render(spec: ShapeSpec) -> Image.Image:
    """Draw `spec` (antialiased by 4x supersampling)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), PALETTE[spec.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = spec.cx * s, spec.cy * s, spec.size * s
    poly = _polygon(spec.shape, cx, cy, r)
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PALETTE[spec.colour])
    elif poly is not None:
        draw.polygon(poly, fill=PALETTE[spec.colour])
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


CENTRES = (16.0,)  # the shape stays centred (see docs/toy.md, "What did not work")
HALF_SIZES = (8.0, 10.0)


def random_spec(rng: random.Random, shape: str, colour: str, background: str) -> ShapeSpec:
    """A small random variation: the half-size is one of `HALF_SIZES` (the centre is one of `CENTRES`).

    Why so little variation: position variation (continuous, then on a 3x3 grid of token positions) gave
    scattered blobs at guidance 10; centring was tried to remove that uncertainty (it did not fix guidance;
    see docs/toy.md). `CENTRES` can grow again once a toy draws well at guidance 10.
    """
    return ShapeSpec(shape, colour, background, rng.choice(CENTRES), rng.choice(CENTRES), rng.choice(HALF_SIZES))


def all_layouts(shape: str, colour: str, background: str) -> list[ShapeSpec]:
    """Every layout (position x size) of one (shape, colour, background)."""
    return [ShapeSpec(shape, colour, background, cx, cy, r) for cx in CENTRES for cy in CENTRES for r in HALF_SIZES]


def sample_specs(per_triple: int, seed: int = 0, colours: tuple[str, ...] = WORLD_COLOURS) -> list[ShapeSpec]:
    """`per_triple` random variations of every (shape, colour, background); deterministic in `seed`."""
    rng = random.Random(seed)
    return [random_spec(rng, *t) for t in all_triples(colours) for _ in range(per_triple)]


def to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, 3, H, W] float32 in [0, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in images])


def write_imagefolder(directory: str | Path, specs: list[ShapeSpec]) -> Path:
    """Write PNGs and `metadata.jsonl` ({"file_name", "text"} per line), the kit's `imagefolder` data source.

    Each line also carries the spec (shape, colour, background, cx, cy, size) for analysis.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(len(specs))))
    with open(directory / "metadata.jsonl", "w") as f:
        for i, spec in enumerate(specs):
            name = f"{i:0{digits}d}.png"
            render(spec).save(directory / name)
            f.write(json.dumps({"file_name": name, "text": caption(spec), **asdict(spec)}) + "\n")
    return directory
