"""Checks on every sample before training: decode and convert to RGB, captions, and the report of what was found.

`load_sample` decodes one sample, converting grayscale, palette, RGBA, CMYK and 16-bit images to RGB (transparency
over `data.background`), refusing unreadable, truncated, non-image and too-small files, and finds its pixel-art grid
(amused_tune.data.pixel_art); `checked_samples` is the one loop over a source's samples; `Report` collects bad
samples, conversions, pixel art and captions too long for the text encoder; `data.on_bad_sample` says whether a bad sample is skipped or stops the run.
"""

from __future__ import annotations

import collections
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from amused_tune.data.cards import DataError
from amused_tune.data.pixel_art import (
    Grid, grid_for, hex_colour, native_colours, palette_of, parse_colour, summary_line,
)
from amused_tune.data.sources import Record, Source
from amused_tune.recipe import DataConfig

log = logging.getLogger(__name__)
WHITE = (255, 255, 255)


class BadSample(Exception):
    """One sample that cannot be used; the message is the reason."""


def to_rgb(image: Image.Image, background=WHITE) -> tuple[Image.Image, str | None]:
    """RGB from any mode; returns (image, what was converted or None). Transparency is laid over `background`
    (data.background, white by default); 16-bit values are scaled to 8 bits (PIL's own convert would clip them)."""
    mode, kind = image.mode, None
    if mode == "RGB":
        return image, None
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else (1.0 if arr.max() <= 1 and mode == "F" else 255.0)
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), "L")
        kind = "16-bit" if mode.startswith("I") else "float"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background[:3], 255)), rgba)
        over = "white" if tuple(background[:3]) == WHITE else hex_colour(background)
        kind = kind or f"{mode} (transparency over {over})"
    return image.convert("RGB"), kind or {"1": "1-bit", "L": "grayscale", "P": "palette"}.get(mode, mode)


def decode(source: Source, record: Record) -> Image.Image:
    """Decode one sample as it is stored (any mode); raises BadSample with the reason."""
    if record.problem:
        raise BadSample(record.problem)
    try:
        if source.kind == "hub":
            value = source.hub[record.ref][source.image_column]
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if value is None:
                raise BadSample("no image in this row")
            if isinstance(value, (bytes, bytearray)):
                value = io.BytesIO(value)
            image = value if isinstance(value, Image.Image) else Image.open(value)
        else:
            image = Image.open(record.ref)
        image.load()  # a truncated file fails here, not mid-run
        return ImageOps.exif_transpose(image)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("file not found") from None
    except Image.UnidentifiedImageError:
        raise BadSample("not an image (unreadable or another file type)") from None
    except Exception as err:  # truncated, corrupt, decompression bomb, ...
        raise BadSample(f"unreadable image ({type(err).__name__}: {err})") from None


def check_size(image: Image.Image, min_size: int) -> None:
    w, h = image.size
    if min(w, h) < min_size:
        raise BadSample(f"too small: {w}x{h} px is smaller than {min_size} px (data.min_image_size=0 upscales it)")


def min_image_size(cfg: DataConfig, resolution: int) -> int:
    """The smallest short side a photo may have: data.min_image_size, else the resolution."""
    return resolution if cfg.min_image_size is None else cfg.min_image_size


def load_sample(source: Source, record: Record, cfg: DataConfig,
                min_size: int) -> tuple[Image.Image, str | None, Grid | None]:
    """A training sample: (RGB image with transparency over data.background, conversion or None, its pixel-art
    grid or None for a photo). Pixel art is never too small (it is enlarged by a whole factor); photos are checked
    against `min_size`. Raises BadSample with the reason."""
    image = decode(source, record)
    rgb, converted = to_rgb(image, parse_colour(cfg.background))
    grid = grid_for(rgb, cfg.pixel_art)
    if grid is None:
        check_size(image, min_size)
    return rgb, converted, grid


def check_caption(record: Record, cfg: DataConfig) -> str:
    """The caption of a sample (data.prompt when set); raises BadSample if it is missing or empty."""
    caption = cfg.prompt or record.caption
    if caption is None:
        raise BadSample("no caption")
    if not caption.strip():
        raise BadSample("empty caption")
    return caption.strip()


def checked_samples(source: Source, records, cfg: DataConfig, min_size: int, report: "Report", stop: bool = True,
                    progress=None):
    """The one check of every sample (the cache, the dataset and the web page read it): yields (record, caption, RGB
    image, pixel-art grid or None) of each usable one (`load_sample`); a bad one is counted in `report` (or, with
    `stop` and data.on_bad_sample=error, stops with its one line), a conversion and pixel art counted.
    `progress.update(1)` after each record when given."""
    for record in records:
        try:
            caption = check_caption(record, cfg)
            image, converted, grid = load_sample(source, record, cfg, min_size)
        except BadSample as bad:
            if stop:
                bad_sample(report, cfg, record.key, str(bad))
            else:
                report.bad.append((record.key, str(bad)))
            continue
        finally:
            if progress is not None:
                progress.update(1)
        report.converted.update([converted] if converted else [])
        report.count_pixel_art(image, grid)
        yield record, caption, image, grid


@dataclass
class Report:
    """What validation found: bad samples (key, reason), conversions by kind, captions cut to 77 tokens."""

    total: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    converted: collections.Counter = field(default_factory=collections.Counter)
    truncated: list[str] = field(default_factory=list)
    pixel_grids: collections.Counter = field(default_factory=collections.Counter)  # native grid "WxH" -> images
    colours: collections.Counter = field(default_factory=collections.Counter)  # pixel art's "#rrggbb" -> art pixels

    def count_pixel_art(self, image: Image.Image, grid: Grid | None) -> None:
        if grid is not None:
            self.pixel_grids[grid.name] += 1
            self.colours.update(native_colours(image, grid))
    copies: int = 0  # recoloured copies of the usable images (data.colour_variants), trained on beside them

    def log(self, listed_in: Path | None = None) -> None:
        if self.converted:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.converted.items()))
            log.warning("data: converted %d images to RGB (%s)", sum(self.converted.values()), kinds)
        if self.truncated:
            log.warning("data: %d captions are longer than 77 tokens and were truncated, e.g. %r",
                        len(self.truncated), self.truncated[0][:120])
        if self.copies:
            log.info("data: %d recoloured copies of the images (data.colour_variants), each with its own caption",
                     self.copies)
        if self.bad:
            reasons = collections.Counter(re.split(r"[:(]", reason)[0].strip() for _, reason in self.bad)
            log.warning("data: skipped %d of %d samples (%s); first: %s: %s%s", len(self.bad), self.total,
                        ", ".join(f"{r}: {n}" for r, n in reasons.most_common()), *self.bad[0],
                        f"; all listed in {listed_in}" if listed_in else "")

    def pixel_line(self, cfg: DataConfig) -> str | None:
        """The one line a run says about pixel art (None when `auto` found none)."""
        if not self.pixel_grids and cfg.pixel_art == "auto":
            return None
        return summary_line(self.pixel_grids, self.total - len(self.bad), cfg.pixel_art, cfg.background)

    def to_dict(self) -> dict:
        return {"samples": self.total, "used": self.total - len(self.bad), "skipped": len(self.bad),
                "bad": [{"sample": k, "reason": r} for k, r in self.bad], "converted": dict(self.converted),
                "truncated_captions": len(self.truncated), "recoloured_copies": self.copies,
                "pixel_art": {"images": sum(self.pixel_grids.values()),
                              "photos": self.total - len(self.bad) - sum(self.pixel_grids.values()),
                              "grids": dict(self.pixel_grids),
                              "palette": palette_of(self.colours)}}


def bad_sample(report: Report, cfg: DataConfig, key: str, reason: str) -> None:
    """Count a bad sample, or stop (data.on_bad_sample=error) with one line naming it."""
    if cfg.on_bad_sample == "error":
        raise DataError(f"{key}: {reason} (data.on_bad_sample=error; set it to skip to train without it)")
    report.bad.append((key, reason))


def check_lengths(prompts: list[str], tokenizer, report: Report) -> None:
    """Note captions longer than the text encoder's 77 tokens (they are truncated when encoded)."""
    if tokenizer is None or not prompts:
        return
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    report.truncated = [p for p, n in zip(prompts, lengths) if n > limit]


def finish(report: Report, cfg: DataConfig, used: int) -> None:
    if used == 0:
        why = f": {report.bad[0][0]}: {report.bad[0][1]}" if report.bad else ""
        raise DataError(f"data: no usable samples in {cfg.path} ({len(report.bad)} bad{why}): point data.path at "
                        "images with captions (see datasets_cards/ for the layouts)")
