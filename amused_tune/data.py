"""Training data: sources of (image, caption) pairs, preprocessing and micro-conditioning.

A dataset item is a dict:
  pixels       float [3, R, R] in [0, 1]  (R = the model's resolution)
  prompt       str
  micro_conds  float [5]: [orig_width, orig_height, crop_top, crop_left, aesthetic score 6]
The trainer also accepts pre-encoded items (`tokens` [h, w], `hidden` [77, D], `pooled` [P]) from a cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from amused_tune.models import micro_conditioning
from amused_tune.recipe import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file or key to fix."""


def preprocess(
    image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False, rng: random.Random | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the short side to `resolution`, crop a square, optionally flip; returns (pixels, micro_conds).

    The micro-conditioning records the image's true original size and where the crop started (top, left) in the
    resized image, as aMUSEd was trained.
    """
    rng = rng or random.Random()
    image = image.convert("RGB")
    orig_w, orig_h = image.size
    scale = resolution / min(orig_w, orig_h)
    new_w, new_h = max(resolution, round(orig_w * scale)), max(resolution, round(orig_h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    return pixels, micro_conditioning(orig_w, orig_h, top, left)


class ImageCaptionDataset(Dataset):
    """(image file, caption) pairs read and preprocessed on access."""

    def __init__(self, items: list[tuple[Path, str]], resolution: int, cfg: DataConfig):
        if not items:
            raise DataError(f"data: no images found in {cfg.path}")
        self.items = items
        self.resolution = resolution
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.items[index]
        with Image.open(path) as image:
            pixels, micro = preprocess(image, self.resolution, self.cfg.center_crop, self.cfg.random_flip, random)
        return {"pixels": pixels, "prompt": self.cfg.prompt_prefix + caption, "micro_conds": micro}


def imagefolder_items(cfg: DataConfig) -> list[tuple[Path, str]]:
    """A folder with metadata.jsonl: one {"file_name": ..., "<caption_column>": ...} object per line."""
    root = Path(cfg.path)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"data.path={cfg.path}: no metadata.jsonl in this folder")
    items = []
    for line_no, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "file_name" not in row or cfg.caption_column not in row:
            raise DataError(f"{meta}:{line_no}: needs keys file_name and {cfg.caption_column}")
        items.append((root / row["file_name"], str(row[cfg.caption_column])))
    return items


def build_dataset(cfg: DataConfig, resolution: int) -> Dataset:
    """The dataset described by the recipe's data section."""
    if cfg.source is None or cfg.path is None:
        raise DataError("data: set data.card, or data.source and data.path")
    if not Path(cfg.path).exists():
        raise DataError(f"data.path={cfg.path} does not exist")
    if cfg.source == "imagefolder":
        return ImageCaptionDataset(imagefolder_items(cfg), resolution, cfg)
    if cfg.source == "single_image":
        if not cfg.prompt:
            raise DataError("data.source=single_image needs data.prompt, e.g. 'A mushroom in [V] style'")
        return ImageCaptionDataset([(Path(cfg.path), cfg.prompt)], resolution, cfg)
    raise DataError(f"data.source={cfg.source} is not supported yet")


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
