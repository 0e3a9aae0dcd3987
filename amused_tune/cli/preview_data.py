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


def preview(recipe, folder: str) -> list[Path]:
    """Write the previews of the first COUNT usable samples into `folder`; returns the files written."""
    from amused_tune.data.checks import BadSample, Report, check_caption, load_sample, min_image_size
    from amused_tune.data.mixture import part_configs
    from amused_tune.data.pixel_art import parse_colour
    from amused_tune.data.preprocess import make_prompt, preprocess
    from amused_tune.data.sources import open_source
    from amused_tune.sampling.images import png_info, save_grid, to_pil
    from amused_tune.writes import write_with
    from amused_tune.sampling.preview import viewable_tiles

    resolution = resolution_without_loading(recipe)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written, pictures, labels = [], [], []
    report = Report()
    for cfg, _ in part_configs(recipe.data):
        source = open_source(cfg)
        for record in source.records:
            if len(pictures) == COUNT:
                break
            try:
                prompt = make_prompt(cfg, check_caption(record, cfg))
                image, _, grid = load_sample(source, record, cfg, min_image_size(cfg, resolution))
            except BadSample:
                continue
            report.total += 1
            report.count_pixel_art(image, grid)
            rng = random.Random(recipe.train.seed * 1_000_003 + len(pictures))  # one draw of the crop and flip
            flip = bool(cfg.random_flip) and rng.random() < 0.5
            pixels, micro = preprocess(image, resolution, None if cfg.center_crop else rng, flip, grid,
                                       parse_colour(cfg.background))
            picture = to_pil(pixels[None])[0]
            texts = {"prompt": prompt, "sample": record.key, "micro_conds": [float(v) for v in micro],
                     "pixel_art": None if grid is None else {"grid": grid.name, "cell": grid.cell},
                     "flip": flip}
            path = out / f"{len(pictures):03d}.png"
            write_with(path, lambda tmp, picture=picture, texts=texts: picture.save(tmp, format="PNG", pnginfo=png_info(texts)),
                       "a preview image")
            written.append(path)
            pictures.append(picture)
            kind = f"pixel art {grid.name}" if grid is not None else "photo"
            labels.append(f"{kind}: {prompt}")
    if not pictures:
        from amused_tune.data.cards import DataError

        raise DataError(f"--preview-data: no usable sample in {recipe.data.path or recipe.data.card}")
    written.append(save_grid(viewable_tiles(pictures, labels), out / "grid.png", {"labels": labels}))
    line = report.pixel_line(part_configs(recipe.data)[0][0])
    print(f"preview: the first {len(pictures)} training images at {resolution} px, as the model receives them"
          + (f"; {line.removeprefix('data: ')}" if line else ""))
    return written


def main(recipe, folder: str) -> int:
    """Write the preview and list its files; a bad recipe or data is one line, exit code 2."""
    from amused_tune.cli.args import fail
    from amused_tune.cli.checks import data_path_problem
    from amused_tune.data.cards import DataError
    from amused_tune.recipe import RecipeError

    if not folder:
        return fail(f"{FLAG} needs a folder to write into: {FLAG} DIR")
    problem = data_path_problem(recipe.data)
    if problem:
        return fail(problem)
    try:
        files = preview(recipe, folder)
    except (RecipeError, DataError) as err:
        return fail(err)
    for path in files:
        print(path)
    return 0
