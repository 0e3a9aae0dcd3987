"""The numbers and pictures of docs/pixel_art.md.

    python bench/pixel_art.py                 # measure the toy's samples with and without the sprite settings
    python bench/pixel_art.py --pictures      # also rewrite docs/pixel_art_*.png

The measurement: the toy base (`model.base: toy`, 32 px, an 8 x 8 grid) samples world captions at its defaults
(sampling.json) and without truncation (min_p 0, where it draws stray cells), and each sample is measured as drawn
and after `--pixel-grid 8 --palette <the toy's nine colours>` (amused_tune.toy.sprite_eval). CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amused_tune.data.pixel_art import find_grid  # noqa: E402
from amused_tune.data.preprocess import preprocess  # noqa: E402
from amused_tune.sampling.images import save_grid, to_pil  # noqa: E402
from amused_tune.sampling.pixel_art import pixelate, shown  # noqa: E402
from amused_tune.sampling.preview import label  # noqa: E402
from amused_tune.toy.classify import is_clean  # noqa: E402
from amused_tune.toy.sprite_eval import TOY_COLOURS, write_palette  # noqa: E402

DOCS = ROOT / "docs"
# a 16 x 16 mushroom: . transparent, o outline, r cap, w spots and stem, s shade
MUSHROOM = """
................
.....oooooo.....
...oorrrrrroo...
..orrwwrrrrrro..
.orrwwwwrrwwrro.
.orrwwwwrrwwwro.
orrrrwwrrrrwwrro
orrrrrrrrrrrrrro
orwwrrrrrrrwwrro
.oorrrrrrrrrroo.
...oooooooooo...
.....owwwwso....
.....owwwwso....
.....owwwwso....
......oooooo....
................
"""
COLOURS = {".": (0, 0, 0, 0), "o": (40, 24, 32, 255), "r": (200, 40, 48, 255), "w": (244, 236, 220, 255),
           "s": (180, 168, 150, 255)}


def mushroom() -> Image.Image:
    rows = [line for line in MUSHROOM.strip().splitlines()]
    return Image.fromarray(np.array([[COLOURS[c] for c in row] for row in rows], dtype=np.uint8), "RGBA")


def tile(image: Image.Image, text: str, size: int = 256) -> Image.Image:
    return label(shown(image).resize((size, size), Image.Resampling.NEAREST), text)


def training_input_picture(path: Path) -> None:
    """The mushroom as the model is trained on it at 256 px: resized like a photo (bicubic) vs as pixel art."""
    from amused_tune.data.checks import to_rgb

    rgb = to_rgb(mushroom(), (255, 255, 255))[0]
    bicubic = to_pil(preprocess(rgb, 256)[0][None])[0]
    nearest = to_pil(preprocess(rgb, 256, grid=find_grid(rgb))[0][None])[0]
    zoom = (96, 48, 160, 112)  # a quarter of the cap, enlarged again to show the edges
    tiles = [label(bicubic, "bicubic (a photo's resize)"), label(nearest, "data.pixel_art: x16 nearest"),
             label(bicubic.crop(zoom).resize((256, 256), Image.Resampling.NEAREST), "bicubic, detail"),
             label(nearest.crop(zoom).resize((256, 256), Image.Resampling.NEAREST), "pixel art, detail")]
    save_grid(tiles, path, nrow=4)


def raw_sample(sprite: Image.Image, seed: int = 0) -> Image.Image:
    """What a 256 px sample of a pixel-art adapter looks like: the sprite enlarged, softened, its colours drifted
    and noisy (made in code: no 256 px weights are loaded here)."""
    rng = np.random.default_rng(seed)
    big = Image.alpha_composite(Image.new("RGBA", sprite.size, (92, 140, 200, 255)), sprite).convert("RGB")
    big = big.resize((256, 256), Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(2.5))
    a = np.asarray(big).astype(float) * rng.uniform(0.9, 1.1, 3) + rng.normal(0, 9, (256, 256, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def sample_picture(path: Path, palette_file: Path) -> None:
    from amused_tune.sampling.pixel_art import read_palette

    sprite = mushroom()
    palette = read_palette(palette_file)
    raw = raw_sample(sprite)
    gridded = pixelate(raw, 16)
    paletted = pixelate(raw, 16, palette)
    clear = pixelate(raw, 16, palette, transparent=True)
    save_grid([label(raw, "raw sample (256 px)"), tile(gridded, "--pixel-grid 16"),
               tile(paletted, "+ --palette mushroom.hex"), tile(clear, "+ --transparent")], path, nrow=4)


def toy_numbers(pictures: Path | None, n_prompts: int, seeds: tuple[int, ...]) -> dict:
    from amused_tune.model.bases import load_components
    from amused_tune.model.sampling_defaults import resolve_sampling
    from amused_tune.toy.sprite_eval import compare

    comps = load_components("toy")
    defaults, _ = resolve_sampling("toy")
    results = {}
    for name, settings in (("defaults", defaults), ("min_p 0", {**defaults, "min_p": 0.0})):
        r = compare(comps, n_prompts, seeds, **settings)
        results[name] = r
        print(f"toy, {name} ({r['samples']} samples): raw {r['raw']}  sprite {r['sprite']}", flush=True)
    if pictures is not None:
        r = results["min_p 0"]
        picks = sorted(range(len(r["images"])), key=lambda i: (is_clean(r["images"][i]), i))[:6]  # stray cells first
        tiles = [tile(r["images"][i], "raw: " + r["prompts"][i]) for i in picks]
        tiles += [tile(pixelate(r["images"][i], 8, TOY_COLOURS, transparent=True),
                       "sprite: " + r["prompts"][i]) for i in picks]
        save_grid(tiles, pictures, nrow=len(picks))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pictures", action="store_true", help="rewrite docs/pixel_art_*.png")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    if args.pictures:
        palette = DOCS / "pixel_art_mushroom.hex"
        palette.write_text("".join("{:02X}{:02X}{:02X}\n".format(*c[:3]) for k, c in COLOURS.items() if k != "."))
        training_input_picture(DOCS / "pixel_art_training_input.png")
        sample_picture(DOCS / "pixel_art_sample.png", palette)
        write_palette(ROOT / "assets" / "pixel_art" / "toy_palette.hex")
    toy_numbers(DOCS / "pixel_art_toy.png" if args.pictures else None, args.prompts, tuple(args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
