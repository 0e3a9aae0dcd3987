"""Samples as real pixel art: an N x N grid of flat cells, colours from a palette, a transparent background.

A sample of a pixel-art adapter looks like pixel art at 256 px but is not: its art pixels are not flat, its colours
drift off any palette and its background is opaque. `pixelate` turns it into the sprite:

1. grid (`--pixel-grid N`, `validation.pixel_grid`): the image is cut into N x N cells (edges at round(i * size / N));
2. colour: with a palette, every pixel is named by its nearest palette colour (RGB distance) and a cell takes the
   colour most of its pixels have; without one, a cell takes the per-channel median of its pixels; `--palette K`
   first takes the medians, then reduces them to K colours (median cut refined by k-means, no dithering);
3. transparency (`--transparent`): the most common colour of the outer ring of cells is the background; the cells of
   that colour connected to the edge (4-neighbours) get alpha 0, every other cell alpha 255.

Palettes (`--palette`, `validation.palette`): K (colours chosen from each image), a `.hex` file (one RRGGBB per line,
as Lospec writes them), a GIMP `.gpl` file, an image whose colours are the palette (at most 256), or `data`: the
training set's colours, which a run records (data_report.json, then with its weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from amused_tune.sampling.preview import upscale

MAX_COLOURS = 256
CHECKER = ((204, 204, 204), (240, 240, 240))  # how a transparent pixel is shown in a grid


class PixelArtError(ValueError):
    """A pixel-art setting that cannot work; the message names the option and what to give instead."""


def _rgb(text: str, where: str) -> tuple[int, int, int]:
    value = text.strip().lstrip("#")
    if len(value) != 6 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise PixelArtError(f"{where}: {text.strip()!r} is not a colour RRGGBB")
    return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))


def _from_hex(path: Path) -> list[tuple[int, int, int]]:
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    return [_rgb(line, f"{path} line {n}") for n, line in lines if not line.strip().startswith(";")]


def _from_gpl(path: Path) -> list[tuple[int, int, int]]:
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != "GIMP Palette":
        raise PixelArtError(f"{path} is not a GIMP palette (its first line must be 'GIMP Palette')")
    colours = []
    for n, line in enumerate(lines[1:], 2):
        text = line.strip()
        if not text or text.startswith("#") or text.split(":")[0] in ("Name", "Columns"):
            continue
        parts = text.split()
        try:
            rgb = tuple(int(v) for v in parts[:3])
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise PixelArtError(f"{path} line {n}: {text!r} is not 'R G B name' with values 0-255")
        colours.append(rgb)
    return colours


def _from_image(path: Path) -> list[tuple[int, int, int]]:
    try:
        with Image.open(path) as img:
            rgba = np.asarray(img.convert("RGBA")).reshape(-1, 4)
    except (OSError, Image.UnidentifiedImageError):
        raise PixelArtError(f"--palette {path}: not a .hex or .gpl palette and not a readable image") from None
    colours = np.unique(rgba[rgba[:, 3] > 0][:, :3], axis=0)
    if len(colours) > MAX_COLOURS:
        raise PixelArtError(f"--palette {path}: the image has {len(colours)} colours; a palette image holds at most "
                            f"{MAX_COLOURS} (or pass --palette K to choose K colours from each sample)")
    return [tuple(int(v) for v in c) for c in colours]


def read_palette(path: str | Path) -> list[tuple[int, int, int]]:
    """The colours of a palette file (.hex, .gpl or an image), duplicates dropped; PixelArtError when it has none."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PixelArtError(f"--palette {path}: no such file (give a number of colours K, a .hex or .gpl palette, "
                            "an image, or data)")
    reader = {".hex": _from_hex, ".gpl": _from_gpl}.get(path.suffix.lower(), _from_image)
    colours = list(dict.fromkeys(reader(path)))
    if not colours:
        raise PixelArtError(f"--palette {path}: the palette has no colours")
    return colours


def resolve_palette(spec, data_palette: list[str] | None = None) -> int | list[tuple[int, int, int]] | None:
    """What `--palette` / `validation.palette` means: None, K (an int), or the colours (of a file, or `data`: the
    training set's, `data_palette` as "#rrggbb" strings)."""
    if spec is None or spec == "":
        return None
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if not 1 <= k <= MAX_COLOURS:
            raise PixelArtError(f"--palette {k}: a number of colours must be in 1..{MAX_COLOURS}")
        return k
    if text == "data":
        if not data_palette:
            raise PixelArtError("--palette data: no training-set colours recorded (train on pixel art with "
                                "data.pixel_art auto or true, or give a palette file)")
        return [_rgb(c, "--palette data") for c in data_palette]
    return read_palette(text)


def check_grid(n, size: tuple[int, int] | None = None) -> None:
    """PixelArtError for a grid that cannot be drawn: N < 1, or N above the image's short side."""
    if n is None:
        return
    if int(n) < 1:
        raise PixelArtError(f"--pixel-grid {n}: the grid must be at least 1 cell a side")
    if size is not None and int(n) > min(size):
        raise PixelArtError(f"--pixel-grid {n} is larger than the {size[0]}x{size[1]} image: give at most "
                            f"{min(size)} cells a side")


def _cell_ids(h: int, w: int, ny: int, nx: int) -> np.ndarray:
    """[h, w] index of the cell (row-major, ny x nx cells) each pixel is in."""
    rows = np.searchsorted(np.round(np.linspace(0, h, ny + 1))[1:], np.arange(h), side="right")
    cols = np.searchsorted(np.round(np.linspace(0, w, nx + 1))[1:], np.arange(w), side="right")
    return rows[:, None] * nx + cols[None, :]


def _medians(a: np.ndarray, ids: np.ndarray, cells: int) -> np.ndarray:
    """[cells, 3] per-channel median (the lower middle value) of each cell's pixels."""
    flat_ids = ids.reshape(-1)
    counts = np.bincount(flat_ids, minlength=cells)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.zeros((cells, 3), dtype=np.uint8)
    for c in range(3):
        values = a[..., c].reshape(-1)
        order = np.lexsort((values, flat_ids))
        out[:, c] = values[order][starts + (counts - 1) // 2]
    return out


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (squared RGB distance) of each pixel [n, 3]."""
    d = ((pixels[:, None, :].astype(np.int32) - palette[None, :, :].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(1)


def _background_mask(cells: np.ndarray) -> np.ndarray:
    """[n, n] bool: the cells of the outer ring's most common colour that touch the edge through cells of it."""
    n_y, n_x = cells.shape[:2]
    ring = np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])
    values, counts = np.unique(ring, axis=0, return_counts=True)
    colour = values[counts.argmax()]
    same = (cells == colour).all(-1)
    seen = np.zeros_like(same)
    stack = [(y, x) for y in range(n_y) for x in range(n_x) if (y in (0, n_y - 1) or x in (0, n_x - 1)) and same[y, x]]
    while stack:
        y, x = stack.pop()
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack += [(y + dy, x + dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
                  if 0 <= y + dy < n_y and 0 <= x + dx < n_x and same[y + dy, x + dx] and not seen[y + dy, x + dx]]
    return seen


def pixelate(image: Image.Image, grid: int | None = None, palette=None, transparent: bool = False) -> Image.Image:
    """The sprite of `image` (see the module docstring): grid x grid cells (None: one per pixel), colours from
    `palette` (None, K or a list of RGB colours), RGBA with a transparent background when `transparent`."""
    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    check_grid(grid, (w, h))
    ny = nx = int(grid) if grid else 0
    ny, nx = (ny, nx) if grid else (h, w)
    ids = _cell_ids(h, w, ny, nx)
    if isinstance(palette, (list, tuple, np.ndarray)) and len(palette):
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        labels = _nearest(a.reshape(-1, 3), colours)
        votes = np.bincount(ids.reshape(-1) * len(colours) + labels, minlength=ny * nx * len(colours))
        cells = colours[votes.reshape(ny * nx, len(colours)).argmax(1)]
    else:
        cells = _medians(a, ids, ny * nx)
        if palette:  # K colours chosen from this image's cells
            small = Image.fromarray(cells.reshape(ny, nx, 3), "RGB")
            reduced = small.quantize(colors=int(palette), method=Image.Quantize.MEDIANCUT, kmeans=4,
                                     dither=Image.Dither.NONE)
            cells = np.asarray(reduced.convert("RGB")).reshape(-1, 3)
    cells = cells.reshape(ny, nx, 3)
    if not transparent:
        return Image.fromarray(np.ascontiguousarray(cells), "RGB")
    alpha = np.where(_background_mask(cells), 0, 255).astype(np.uint8)
    rgba = np.concatenate([cells * (alpha[..., None] > 0), alpha[..., None]], axis=-1).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def shown(image: Image.Image) -> Image.Image:
    """A sprite as a grid shows it: enlarged by a whole factor with nearest-neighbour to at least MIN_TILE px, its
    transparent pixels over a checkerboard (RGB)."""
    return on_checkerboard(upscale(image))


def on_checkerboard(image: Image.Image, square: int = 16) -> Image.Image:
    """An RGBA image over a light checkerboard (how a transparent pixel is shown), as RGB; RGB images as they are."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    y, x = np.mgrid[: image.height, : image.width]
    board = np.asarray(CHECKER, dtype=np.uint8)[((y // square + x // square) % 2)]
    back = Image.fromarray(board, "RGB").convert("RGBA")
    return Image.alpha_composite(back, image).convert("RGB")


def describe(settings: dict | None) -> str | None:
    """Pixel-art settings in words ("a 32 x 32 grid, the training set's 16 colours, transparent background")."""
    if not active(settings):
        return None
    parts = []
    if settings.get("grid"):
        parts.append(f"a {settings['grid']} x {settings['grid']} grid of flat cells")
    spec, colours = settings.get("palette"), settings.get("colours") or []
    if spec == "data":
        parts.append(f"the training set's {len(colours)} colours")
    elif isinstance(spec, int) or str(spec).isdigit():
        parts.append(f"{spec} colours chosen per image")
    elif spec:
        parts.append(f"the {len(colours)} colours of {Path(str(spec)).name}")
    if settings.get("transparent"):
        parts.append("transparent background")
    return ", ".join(parts)


def settings_record(grid, palette_spec, transparent: bool, data_palette: list[str] | None = None) -> dict | None:
    """What a run records about pixel art (None when it has nothing to record): the sampling settings (the grid, the
    palette as given and its colours, "#rrggbb", so the record stands without the file, transparency) and the
    training set's colours (`data_colours`, what `--palette data` means later)."""
    if not grid and palette_spec in (None, "") and not transparent and not data_palette:
        return None
    resolved = resolve_palette(palette_spec, data_palette)
    colours = ["#{:02x}{:02x}{:02x}".format(*c) for c in resolved] if isinstance(resolved, list) else None
    spec = resolved if isinstance(resolved, int) else (None if palette_spec in (None, "") else str(palette_spec))
    return {"grid": int(grid) if grid else None, "palette": spec, "colours": colours, "transparent": bool(transparent),
            "data_colours": list(data_palette) if data_palette else None}


def active(settings: dict | None) -> bool:
    """Whether settings turn samples into sprites (a grid, a palette or transparency)."""
    return bool(settings) and any(settings.get(k) for k in ("grid", "palette", "transparent"))


def palette_from_record(settings: dict):
    """The palette a record's settings give (`pixelate`'s argument): K, the recorded colours, or None."""
    if isinstance(settings.get("palette"), int):
        return settings["palette"]
    colours = settings.get("colours")
    return [_rgb(c, "recorded palette") for c in colours] if colours else None


def chosen_settings(grid, palette, transparent: bool, recorded: dict | None) -> tuple[dict | None, dict]:
    """(settings to sample with, the ones taken from `recorded`): each of grid, palette and transparency as given,
    else as the adapter recorded it (a recorded palette comes with its colours, so its file need not be here);
    `--palette data` is the recorded training set's colours."""
    recorded = recorded or {}
    taken = {}
    if grid is None and recorded.get("grid"):
        grid = taken["grid"] = recorded["grid"]
    if not transparent and recorded.get("transparent"):
        transparent = taken["transparent"] = True
    data = recorded.get("data_colours")
    if palette is None and recorded.get("palette") is not None:
        taken["palette"] = recorded["palette"]
        return {"grid": grid, "palette": recorded["palette"], "colours": recorded.get("colours"),
                "transparent": transparent, "data_colours": data}, taken
    return settings_record(grid, palette, transparent, data), taken
