"""Colour augmentation (`data.colour_variants`): more content for the same style, from the images themselves.

A caption that names colours ("a red triangle on a white background in [V] style") says which colours are the
image's *content*; the colours it does not name (a grey frame, a palette, the brush work) are its *style*. Each
recoloured variant of an image moves every colour its caption names to another colour of a vocabulary
(`data.colours`, name -> RGB) and rewrites those words of the caption to match, so the style is shown on content
the one image never had ("a green triangle on a yellow background in [V] style"), with nothing else changed.

How a pixel is read: it belongs to its nearest vocabulary colour (RGB distance). A vocabulary colour is *in* the
image when at least `MIN_SHARE` of the pixels belong to it. Recolouring a named colour s to t adds t - s to each of
its pixels (shading and texture kept, clipped to 0..255); on flat pixel art it is an exact palette swap. A variant
maps every named colour that is in the image, one to one, onto vocabulary colours that are neither in the image nor
named (or are among the recoloured ones, so two named colours may swap); a colour the caption names but the image
does not show keeps its word, and unnamed colours in the image are never a target, so the style's stay the style's.

The variants of an image are a fixed set: every such mapping, in an order drawn from the image's file name, the
first `data.colour_variants` of them. They are cached beside the image (each as a sample of its own, with its own
caption), so training draws the image and its variants alike and a resumed run draws exactly the same.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# the vocabulary used when data.colours is unset: basic colour names, each at a typical RGB value
DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (250, 140, 20), "yellow": (240, 220, 30), "green": (30, 170, 40),
    "blue": (30, 60, 220), "purple": (130, 40, 170), "pink": (245, 140, 190), "brown": (130, 80, 30),
    "white": (245, 245, 245), "grey": (128, 128, 128), "black": (15, 15, 15),
}
MIN_SHARE = 0.01  # a vocabulary colour owning fewer pixels than this share is not in the image
ENUMERATED = 20_000  # up to this many mappings are listed and shuffled; above, distinct ones are drawn


@dataclass(frozen=True)
class Recolour:
    """One variant: each (named colour, target colour) pair of `mapping`, over `vocabulary` (name -> RGB)."""

    mapping: tuple[tuple[str, str], ...]
    vocabulary: tuple[tuple[str, tuple[int, int, int]], ...]

    @property
    def suffix(self) -> str:
        """What the variant adds to its sample's key, e.g. '#red-green,white-yellow'."""
        return "#" + ",".join(f"{s}-{t}" for s, t in self.mapping)

    def caption(self, text: str) -> str:
        """`text` with every named colour word replaced by its target (all at once, so swaps stay swaps)."""
        table = dict(self.mapping)
        pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in table) + r")\b", re.IGNORECASE)

        def swap(match: re.Match) -> str:
            word, new = match.group(0), table[match.group(0).lower()]
            return new.capitalize() if word[0].isupper() else new

        return pattern.sub(swap, text)

    def image(self, image: Image.Image) -> Image.Image:
        """`image` (RGB) with the pixels of each named colour moved by (target - named colour)."""
        names = [n for n, _ in self.vocabulary]
        palette = np.array([rgb for _, rgb in self.vocabulary], dtype=np.int32)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        owner = nearest(pixels, palette)
        shift = np.zeros_like(palette)
        for source, target in self.mapping:
            shift[names.index(source)] = palette[names.index(target)] - palette[names.index(source)]
        return Image.fromarray(np.clip(pixels + shift[owner], 0, 255).astype(np.uint8), "RGB")


def vocabulary(colours: dict | None) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """data.colours (or the default) as ((lower-case name, RGB), ...); raises ValueError on a bad entry."""
    out = []
    for name, rgb in (colours or DEFAULT_COLOURS).items():
        values = tuple(int(v) for v in rgb)
        if len(values) != 3 or not all(0 <= v <= 255 for v in values) or not re.fullmatch(r"[\w-]+", str(name)):
            raise ValueError(f"data.colours: {name}: {list(rgb)} is not a one-word name with an RGB triple "
                             "(three values 0-255), e.g. red: [220, 30, 30]")
        out.append((str(name).lower(), values))
    if len(out) < 2:
        raise ValueError("data.colours needs at least two colours to recolour between")
    return tuple(out)


def nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H, W] index of each pixel's nearest palette colour (squared RGB distance)."""
    return ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1).argmin(-1)


def named_colours(caption: str, names: list[str]) -> list[str]:
    """The vocabulary names the caption uses as whole words, in their order in the caption, each once."""
    found = re.findall(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", caption, re.IGNORECASE)
    return list(dict.fromkeys(w.lower() for w in found))


def recolourings(image: Image.Image, caption: str, key: str, count: int,
                 colours: dict | None = None) -> list[Recolour]:
    """The first `count` variants of one image (see the module docstring); [] when the caption names no colour
    the image shows. `key` (the sample's file name is used) fixes their order."""
    if count <= 0:
        return []
    vocab = vocabulary(colours)
    names = [n for n, _ in vocab]
    owner = nearest(np.asarray(image.convert("RGB"), dtype=np.int32), np.array([c for _, c in vocab]))
    share = np.bincount(owner.ravel(), minlength=len(names)) / owner.size
    shown = {n for n, s in zip(names, share) if s >= MIN_SHARE}
    words = named_colours(caption, names)
    named = [n for n in words if n in shown]
    if not named:
        return []
    targets = [n for n in names if n in named or (n not in shown and n not in words)]
    rng = random.Random(int(hashlib.sha256(f"{Path(key).name}#colours".encode()).hexdigest()[:16], 16))
    if math.perm(len(targets), len(named)) <= ENUMERATED:
        maps = [m for m in itertools.permutations(targets, len(named)) if m != tuple(named)]
        rng.shuffle(maps)
    else:  # too many to list (a large vocabulary): distinct ones drawn at random, still a function of the key
        maps, seen = [], {tuple(named)}
        while len(maps) < min(count, math.perm(len(targets), len(named)) - 1):
            m = tuple(rng.sample(targets, len(named)))
            if m not in seen:
                seen.add(m)
                maps.append(m)
    return [Recolour(tuple(zip(named, m)), vocab) for m in maps[:count]]


def colour_copies(image: Image.Image, caption: str, key: str, cfg) -> list[tuple[str, Image.Image, str]]:
    """(key suffix, image, caption) of a sample and of each of its recoloured copies under data section `cfg`:
    the sample itself first (suffix '')."""
    copies = recolourings(image, caption, key, cfg.colour_variants, cfg.colours)
    return [("", image, caption)] + [(r.suffix, r.image(image), r.caption(caption)) for r in copies]
