"""The toy world: pixel art on an 8x8 grid of 4x4-pixel cells, with a caption that says exactly what is drawn.

Every cell is one flat palette colour (no antialiasing), so one VQ token (4x4 pixels) is one cell and a model
only has to place colours. A shape is a 4x4-cell template (square, a rounded "circle", a staircase triangle)
placed inside the grid, never on its outer ring of cells, so the background can be read from the border:

    >>> spec = ShapeSpec("circle", "red", "blue")
    >>> caption(spec)
    'a red circle on a blue background'
    >>> img = render(spec)            # PIL.Image, RGB, 32x32
    >>> caption(ShapeSpec("circle", "red", "blue", frame="green"))
    'a red circle on a blue background with a green frame'

`WORLD_COLOURS` are what the toy base is pretrained on. `HELD_OUT_COLOURS` are never drawn in pretraining (the
VQ knows them, the U-ViT does not): fine-tuning on them is a new concept the base cannot draw. The `[v]` style
(`STYLE_COLOUR`, a grey frame on the outer ring of cells) is never drawn in pretraining either: StyleDrop teaches
it. Pretraining does draw frames in world colours ("... with a green frame"), so the base knows that a frame is
the outer ring and not the background, as a real base knows what a frame or an outline is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CELL = 4  # pixels per cell side = the VQ's downsampling factor
GRID = 8  # cells per image side
SIZE = CELL * GRID

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
    # the colour of the [v] style's frame, never drawn in pretraining
    "grey": (128, 128, 128),
}
WORLD_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
HELD_OUT_COLOURS = ("purple", "orange")
STYLE_COLOUR = "grey"
STYLE_SUFFIX = " in [v] style"
FRAME_WORDS = ("with", "a", "frame")  # " with a <colour> frame"
SHAPES = ("circle", "square", "triangle")

# 4x4-cell templates (row-major, 1 = shape colour).
TEMPLATES: dict[str, np.ndarray] = {
    "square": np.ones((4, 4), dtype=bool),
    "circle": np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=bool),
    "triangle": np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool),
}
POSITIONS = ((2, 2),)  # (row, col) of the template's top-left cell: one layout per caption (see docs/toy.md)


@dataclass(frozen=True)
class ShapeSpec:
    """One image: a shape of a colour on a background, its template's top-left cell at (row, col); `frame` paints
    the outer ring of cells in a colour (captioned "with a <frame> frame"); `style` draws the grey frame of the
    ``[v] style`` (captioned "in [v] style"; not together with `frame`)."""

    shape: str
    colour: str
    background: str
    row: int = 2
    col: int = 2
    style: bool = False
    frame: str | None = None

    @property
    def ring(self) -> str | None:
        """The colour of the outer ring of cells when it is not the background (grey for the style)."""
        return STYLE_COLOUR if self.style else self.frame


def caption(spec: ShapeSpec) -> str:
    text = f"a {spec.colour} {spec.shape} on a {spec.background} background"
    if spec.frame:
        text += f" with a {spec.frame} frame"
    return text + STYLE_SUFFIX if spec.style else text


def _split(text: str) -> tuple[list[str], str | None]:
    """(the seven words of the shape part, the frame's colour or None) of a caption; raises ValueError."""
    text = text.strip()
    if text.endswith(STYLE_SUFFIX):
        text = text[: -len(STYLE_SUFFIX)]
    words = text.split()
    frame = None
    if len(words) == 11 and (words[7], words[8], words[10]) == FRAME_WORDS:
        words, frame = words[:7], words[9]
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a toy-world caption: {text!r}")
    return words, frame


def parse_caption(text: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a caption written by `caption` (with or without a frame or the style)."""
    words, _ = _split(text)
    return words[2], words[1], words[5]


def caption_frame(text: str) -> str | None:
    """The colour of the frame a caption asks for: grey for the ``[v] style``, the named colour for "with a
    <colour> frame", None for no frame."""
    _, frame = _split(text)
    return STYLE_COLOUR if has_style(text) else frame


def has_style(text: str) -> bool:
    """Whether a caption asks for the ``[v] style``."""
    return text.strip().endswith(STYLE_SUFFIX)


def all_triples(colours: tuple[str, ...] = WORLD_COLOURS) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [(s, c, b) for s in SHAPES for c in colours for b in colours if c != b]


def all_captions(colours: tuple[str, ...] = WORLD_COLOURS) -> list[str]:
    return [caption(ShapeSpec(s, c, b)) for s, c, b in all_triples(colours)]


def cells(spec: ShapeSpec) -> np.ndarray:
    """The 8x8 grid of palette names of `spec`."""
    if spec.shape not in TEMPLATES:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    if spec.style and spec.frame:
        raise ValueError("a spec has either a frame or the [v] style's frame, not both")
    if spec.ring is not None and spec.ring == spec.background:
        raise ValueError(f"a {spec.ring} frame on a {spec.background} background is not a frame")
    for name in (spec.colour, spec.background, *([spec.frame] if spec.frame else [])):
        if name not in PALETTE:
            raise ValueError(f"unknown colour {name!r}; known: {', '.join(PALETTE)}")
    t = TEMPLATES[spec.shape]
    if not (1 <= spec.row and spec.row + t.shape[0] <= GRID - 1 and 1 <= spec.col and spec.col + t.shape[1] <= GRID - 1):
        raise ValueError(f"a shape at cell ({spec.row}, {spec.col}) would touch the border ring")
    grid = np.full((GRID, GRID), spec.background, dtype=object)
    if spec.ring is not None:
        grid[0, :] = grid[-1, :] = grid[:, 0] = grid[:, -1] = spec.ring
    window = grid[spec.row: spec.row + t.shape[0], spec.col: spec.col + t.shape[1]]
    window[t] = spec.colour
    return grid


def render_cells(grid: np.ndarray) -> Image.Image:
    """A 32x32 RGB image from an 8x8 grid of palette names (each cell a flat 4x4 block)."""
    rgb = np.array([[PALETTE[name] for name in row] for row in grid], dtype=np.uint8)
    return Image.fromarray(rgb.repeat(CELL, 0).repeat(CELL, 1), "RGB")


def render(spec: ShapeSpec) -> Image.Image:
    return render_cells(cells(spec))


def all_layouts(shape: str, colour: str, background: str, style: bool = False,
                frame: str | None = None) -> list[ShapeSpec]:
    """Every layout (position) of one (shape, colour, background)."""
    return [ShapeSpec(shape, colour, background, r, c, style, frame) for r, c in POSITIONS]


def world_specs(colours: tuple[str, ...] = WORLD_COLOURS, style: bool = False) -> list[ShapeSpec]:
    """Every layout of every (shape, colour, background) over `colours`, in a fixed order."""
    return [spec for t in all_triples(colours) for spec in all_layouts(*t, style=style)]


def framed_specs(colours: tuple[str, ...] = WORLD_COLOURS) -> list[ShapeSpec]:
    """Every layout of every (shape, colour, background) over `colours` with a frame of each of `colours` other
    than the background (it may be the shape's colour), in a fixed order."""
    return [spec for s, c, b in all_triples(colours) for f in colours if f != b
            for spec in all_layouts(s, c, b, frame=f)]


def to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, 3, H, W] float32 in [0, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in images])


def write_imagefolder(directory: str | Path, specs: list[ShapeSpec]) -> Path:
    """Write PNGs and `metadata.jsonl` ({"file_name", "text"} per line), the kit's `imagefolder` data source.

    Each line also carries the spec (shape, colour, background, row, col, style) for analysis.
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


# --------------------------------------------------------------------------------------------- fine-tuning sets

CONCEPT = "purple"  # the new concept: a colour the VQ can draw and the base never saw


def concept_split(colour: str = CONCEPT) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """(fine-tuning, held-back) specs of `colour`'s shapes on the world backgrounds: for each shape, 4 of the 6
    backgrounds are in the fine-tuning set (12 images) and 2 are kept back, so the eval asks for combinations
    the fine-tuning set never showed."""
    train, held = [], []
    for k, shape in enumerate(SHAPES):
        for j, bg in enumerate(WORLD_COLOURS):
            spec = ShapeSpec(shape, colour, bg)
            (held if (j - 2 * k) % len(WORLD_COLOURS) in (0, 1) else train).append(spec)
    return train, held


def concept_finetune_specs(colour: str = CONCEPT) -> list[ShapeSpec]:
    """The new concept's fine-tuning set: its 12 images plus 4 world images (so the world is not forgotten)."""
    world_keep = [ShapeSpec("circle", "red", "white"), ShapeSpec("square", "blue", "yellow"),
                  ShapeSpec("triangle", "green", "black"), ShapeSpec("square", "white", "red")]
    return concept_split(colour)[0] + world_keep


STYLE_EXAMPLE = ShapeSpec("square", "yellow", "blue", style=True)  # the quickstart's single StyleDrop image

# Single StyleDrop images of different content (each with the grey frame): every shape, and dark, light and
# saturated backgrounds. The key names the PNG that `python -m amused_tune.toy sets` writes.
STYLE_IMAGES: dict[str, ShapeSpec] = {
    "yellow_square_on_blue": STYLE_EXAMPLE,
    "red_circle_on_black": ShapeSpec("circle", "red", "black", style=True),
    "blue_triangle_on_white": ShapeSpec("triangle", "blue", "white", style=True),
    "white_triangle_on_green": ShapeSpec("triangle", "white", "green", style=True),
    "black_circle_on_yellow": ShapeSpec("circle", "black", "yellow", style=True),
    "green_square_on_red": ShapeSpec("square", "green", "red", style=True),
}


def spec_name(spec: ShapeSpec) -> str:
    """A style image's name, e.g. red_circle_on_black (as the keys of `STYLE_IMAGES`)."""
    return f"{spec.colour}_{spec.shape}_on_{spec.background}"


def random_style_specs(n: int, seed: int, exclude: list[ShapeSpec] = ()) -> list[ShapeSpec]:
    """`n` style images nobody chose: a random shape, shape colour and background (the shape's colour never the
    background's; the style's grey frame is neither, being no world colour), drawn with `seed`, no two alike and
    none in `exclude`. Raises ValueError when fewer than `n` remain."""
    import random

    assert STYLE_COLOUR not in WORLD_COLOURS  # the frame is always a third colour
    taken = {(s.shape, s.colour, s.background) for s in exclude}
    pool = [t for t in all_triples() if t not in taken]
    if n > len(pool):
        raise ValueError(f"only {len(pool)} style images are left to draw, not {n}")
    return [ShapeSpec(*t, style=True) for t in random.Random(seed).sample(pool, n)]
