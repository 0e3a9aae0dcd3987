"""Images in and out of the sampler: input images and inpainting masks as tensors, outputs as PIL images and PNG
grids whose text chunks carry the prompts, seeds and settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from amused_tune.writes import write_with


def _open(source: str | Path | Image.Image, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if not Path(source).is_file():
        raise FileNotFoundError(f"{what} file {source} does not exist")
    return Image.open(source)


def _square(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Centre-crop to a square, then resize to size x size."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), resample)


def load_image(image: str | Path | Image.Image | torch.Tensor, size: int) -> torch.Tensor:
    """An input image as [1, 3, size, size] in [0, 1]: a path, a PIL image (centre-cropped, resized) or a tensor."""
    if isinstance(image, torch.Tensor):
        t = image.float().reshape(-1, *image.shape[-3:])
        return t if t.shape[-2:] == (size, size) else F.interpolate(t, (size, size), mode="bicubic").clamp(0, 1)
    img = _square(_open(image, "image").convert("RGB"), size, Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None] / 255.0


def mask_to_grid(mask: str | Path | Image.Image | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """An inpainting mask (white = regenerate) as bool [1 or B, h, w]: a token is regenerated if any of its pixels
    is white (>= 0.5 after greyscale), so every white pixel is repainted and untouched tokens stay exactly."""
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        m = m.reshape(-1, 1, *m.shape[-2:]) if m.dim() != 4 else m.mean(1, keepdim=True)
    else:
        g = _open(mask, "mask").convert("L")
        side = min(g.size)
        g = _square(g, side, Image.NEAREST)  # same crop as the image, no resampling of values
        m = torch.from_numpy(np.array(g))[None, None] / 255.0
    return F.adaptive_max_pool2d((m >= 0.5).float(), grid)[:, 0] > 0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL RGB images (rounded to 8 bits)."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()
    return [Image.fromarray(a.numpy(), "RGB") for a in arr]


def png_info(texts: dict) -> PngImagePlugin.PngInfo:
    """PNG text chunks: strings as they are, anything else as JSON."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return info


def save_grid(images: torch.Tensor | list[Image.Image], path: str | Path, texts: dict | None = None,
              nrow: int | None = None) -> Path:
    """Write a PNG grid (rows of `nrow`, default ceil(sqrt(B))) with `texts` (prompts, seeds...) as text chunks."""
    pils = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    nrow = nrow or math.ceil(math.sqrt(len(pils)))
    w, h = pils[0].size
    rows = math.ceil(len(pils) / nrow)
    canvas = Image.new("RGB", (nrow * w, rows * h))
    for k, img in enumerate(pils):
        canvas.paste(img, ((k % nrow) * w, (k // nrow) * h))
    return write_with(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=png_info(texts or {})), "a sample grid")
