"""`amused-tune RECIPE.yaml --preview-data DIR`: the first training images exactly as the model receives them.

Each of the first `COUNT` usable samples goes through the trainer's own steps (decode, transparency over
`data.background`, pixel-art enlargement or photo resize, crop, flip; one draw of the random crop and flip each)
and is written as DIR/NNN.png at the model's resolution (prompt, micro-conditioning and pixel-art grid in its text
chunks), with DIR/grid.png: every image labelled with its prompt. No model is loaded: the resolution comes from
`model.resolution`, the base's config files or its name.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

FLAG = "--preview-data"
COUNT = 16


def split_preview_arg(argv: list[str]) -> tuple[list[str], str | None]:
    """(argv without `--preview-data DIR`, DIR or None); a flag without a folder gives ""."""
    rest, folder, i = [], None, 0
    while i < len(argv):
        if argv[i].startswith(FLAG + "="):
            folder = argv[i].split("=", 1)[1]
        elif argv[i] == FLAG:
            folder = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            i += 1 if folder else 0
        else:
            rest.append(argv[i])
        i += 1
    return rest, folder


def resolution_without_loading(recipe) -> int:
    """The training resolution from model.resolution, the base's config files, or its Hub name."""
    from amused_tune.common import TOY_WEIGHTS_DIR
    from amused_tune.recipe import RecipeError

    base = recipe.model.base
    if recipe.model.resolution:
        return int(recipe.model.resolution)
    if base == "tiny":
        return 32
    folder = TOY_WEIGHTS_DIR if base == "toy" else Path(base).expanduser()
    try:
        size = json.loads((folder / "transformer" / "config.json").read_text())["sample_size"]
        levels = len(json.loads((folder / "vqvae" / "config.json").read_text())["block_out_channels"])
        return int(size) * 2 ** (levels - 1)
    except (OSError, ValueError, KeyError):
        found = re.search(r"amused-(256|512)$", base)
        if found:
            return int(found.group(1))
    raise RecipeError(f"--preview-data: the resolution of model.base={base} is not known without loading it: "
                      "set model.resolution")


def preview(recipe, folder: str, plan=None) -> list[Path]:
    """Write the previews of the first COUNT usable samples into `folder`; returns the files written. `plan`: the
    data as the preflight resolved and listed it (made here when None)."""
    from amused_tune.data.cards import DataError
    from amused_tune.data.checks import Report, checked_samples, min_image_size
    from amused_tune.data.pixel_art import parse_colour
    from amused_tune.data.preflight import preflight
    from amused_tune.data.preprocess import make_prompt, preprocess
    from amused_tune.sampling.images import png_info, save_grid, to_pil
    from amused_tune.sampling.preview import viewable_tiles
    from amused_tune.writes import write_with

    resolution = resolution_without_loading(recipe)
    plan = plan or preflight(recipe.data)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written, pictures, labels = [], [], []
    report = Report()
    for part in plan.parts:
        cfg, source = part.cfg, part.source()
        for record, caption, image, grid in checked_samples(source, source.records, cfg,
                                                            min_image_size(cfg, resolution), report, stop=False):
            prompt = make_prompt(cfg, caption)
            rng = random.Random(recipe.train.seed * 1_000_003 + len(pictures))  # one draw of the crop and flip
            flip = bool(cfg.random_flip) and rng.random() < 0.5
            pixels, micro = preprocess(image, resolution, None if cfg.center_crop else rng, flip, grid,
                                       parse_colour(cfg.background))
            picture = to_pil(pixels[None])[0]
            texts = {"prompt": prompt, "sample": record.key, "micro_conds": [float(v) for v in micro],
                     "pixel_art": None if grid is None else {"grid": grid.name, "cell": grid.cell},
                     "flip": flip}
            path = out / f"{len(pictures):03d}.png"
            write_with(path, lambda tmp, picture=picture, texts=texts: picture.save(tmp, format="PNG",
                                                                                    pnginfo=png_info(texts)),
                       "a preview image")
            written.append(path)
            pictures.append(picture)
            kind = f"pixel art {grid.name}" if grid is not None else "photo"
            labels.append(f"{kind}: {prompt}")
            if len(pictures) == COUNT:
                break
        if len(pictures) == COUNT:
            break
    report.total = len(pictures) + len(report.bad)
    if not pictures:
        raise DataError(f"--preview-data: no usable sample in {recipe.data.path or recipe.data.card}")
    written.append(save_grid(viewable_tiles(pictures, labels), out / "grid.png", {"labels": labels}))
    line = report.pixel_line(plan.parts[0].cfg)
    print(f"preview: the first {len(pictures)} training images at {resolution} px, as the model receives them"
          + (f"; {line.removeprefix('data: ')}" if line else ""))
    return written


def main(recipe, folder: str) -> int:
    """Write the preview and list its files; a bad recipe or data is one line, exit code 2."""
    from amused_tune.cli.args import fail
    from amused_tune.data.cards import DataError
    from amused_tune.data.preflight import preflight
    from amused_tune.recipe import RecipeError

    if not folder:
        return fail(f"{FLAG} needs a folder to write into: {FLAG} DIR")
    try:  # the data resolved and listed once, before anything is written (a typo in data.path is said here)
        files = preview(recipe, folder, preflight(recipe.data))
    except (RecipeError, DataError, OSError) as err:
        return fail(err)
    for path in files:
        print(path)
    return 0
