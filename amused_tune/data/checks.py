"""Checks on every sample before training: decode and convert to RGB, captions, and the report of what was found.

`load_image` decodes one sample, converting grayscale, palette, RGBA, CMYK and 16-bit images to RGB and refusing
unreadable, truncated, non-image and too-small files; `Report` collects bad samples, conversions and captions too
long for the text encoder; `data.on_bad_sample` says whether a bad sample is skipped or stops the run.
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
from amused_tune.data.sources import Record, Source
from amused_tune.recipe import DataConfig

log = logging.getLogger(__name__)


class BadSample(Exception):
    """One sample that cannot be used; the message is the reason."""


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB from any mode; returns (image, what was converted or None). Transparency is laid over white;
    16-bit values are scaled to 8 bits (PIL's own convert would clip them)."""
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
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        kind = kind or f"{mode} (transparency over white)"
    return image.convert("RGB"), kind or {"1": "1-bit", "L": "grayscale", "P": "palette"}.get(mode, mode)


def load_image(source: Source, record: Record, min_size: int) -> tuple[Image.Image, str | None]:
    """Decode and check one sample; raises BadSample with the reason. Returns (RGB image, conversion or None)."""
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
        image = ImageOps.exif_transpose(image)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("file not found") from None
    except Image.UnidentifiedImageError:
        raise BadSample("not an image (unreadable or another file type)") from None
    except Exception as err:  # truncated, corrupt, decompression bomb, ...
        raise BadSample(f"unreadable image ({type(err).__name__}: {err})") from None
    w, h = image.size
    if min(w, h) < min_size:
        raise BadSample(f"too small: {w}x{h} px is smaller than {min_size} px (data.min_image_size=0 upscales it)")
    return to_rgb(image)


def check_caption(record: Record, cfg: DataConfig) -> str:
    """The caption of a sample (data.prompt when set); raises BadSample if it is missing or empty."""
    caption = cfg.prompt or record.caption
    if caption is None:
        raise BadSample("no caption")
    if not caption.strip():
        raise BadSample("empty caption")
    return caption.strip()


@dataclass
class Report:
    """What validation found: bad samples (key, reason), conversions by kind, captions cut to 77 tokens."""

    total: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    converted: collections.Counter = field(default_factory=collections.Counter)
    truncated: list[str] = field(default_factory=list)
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

    def to_dict(self) -> dict:
        return {"samples": self.total, "used": self.total - len(self.bad), "skipped": len(self.bad),
                "bad": [{"sample": k, "reason": r} for k, r in self.bad], "converted": dict(self.converted),
                "truncated_captions": len(self.truncated), "recoloured_copies": self.copies}


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
