"""Sample grids during training: `samples/step-N.png`, drawn with the kit's sampler.

The prompts are encoded once, before training, so that sampling needs neither the text encoder on the
accelerator nor a second copy of it (unless the text encoder itself is being trained). Sampling draws from its
own per-image generators: it never touches the training RNG, so a run with validation trains exactly like one
without.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amused_tune.model.bases import Components, decode_tokens, encode_prompts, micro_conditioning
from amused_tune.recipe import Recipe, RecipeError
from amused_tune.sampling.pixel_art import (
    PixelArtError, active, palette_from_record, pixelate, settings_record, shown,
)
from amused_tune.sampling.preview import viewable_tiles
from amused_tune.sampling.sampler import sample_tokens, save_grid, to_pil
from amused_tune.train.report import say
from amused_tune.model.sampling_defaults import describe_taken, resolve_sampling


DRAWS = "fast"  # one uniform per token, drawn up front (amused-tune sample --draws fast redraws a grid's image)


class Validator:
    """Writes one grid of `validation.prompts` x `images_per_prompt` per call."""

    def __init__(self, recipe: Recipe, comps: Components, empty: tuple[torch.Tensor, torch.Tensor]):
        v = recipe.validation
        self.recipe, self.comps = recipe, comps
        self.prompts = [p for p in v.prompts for _ in range(v.images_per_prompt)]
        self.seeds = [v.seed + i for i in range(len(self.prompts))]
        self.empty = empty
        self.cond = self._encode() if self.enabled and not recipe.adapter.text_encoder else None
        given = {k: getattr(v, k) for k in ("guidance", "guidance_schedule", "steps", "temperature", "min_p", "top_k")}
        self.sampling, taken = resolve_sampling(recipe.model.base, **given) if self.enabled else ({}, {})
        self.defaults_message = describe_taken(recipe.model.base, taken)  # values the base's sampling.json gave
        self.pixel_art = pixel_art_settings(recipe)  # validation.pixel_grid / palette / transparent
        if self.enabled and v.pixel_grid and v.pixel_grid > comps.resolution:
            raise RecipeError(f"validation.pixel_grid={v.pixel_grid} is larger than the {comps.resolution} px samples: "
                              f"give at most {comps.resolution}")

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def _encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.comps.text_encoder, self.comps.tokenizer, self.prompts)

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.recipe.validation.every == 0 or step == self.recipe.train.max_steps)

    @torch.no_grad()
    def __call__(self, transformer: torch.nn.Module, step: int, out: Path, accelerator) -> Path:
        v = self.recipe.validation
        n = len(self.prompts)
        say(f"samples: writing {out / 'samples' / f'step-{step}.png'} ({n} image{'' if n == 1 else 's'}) ...")
        cond = self.cond if self.cond is not None else self._encode()
        empty = self.empty if self.cond is not None else encode_prompts(  # a text-encoder LoRA changes it too
            self.comps.text_encoder, self.comps.tokenizer, [""])
        was_training = transformer.training
        transformer.eval()
        res = self.comps.resolution
        with accelerator.autocast():
            tokens = sample_tokens(
                transformer, cond, empty, self.seeds, micro_conds=micro_conditioning(res, res), draws=DRAWS,
                **self.sampling,
            )
        transformer.train(was_training)
        vq = self.comps.vqvae
        home = next(vq.parameters()).device  # training from the cache parks the VQ model on the CPU
        vq.to(tokens.device)  # one image at a time: the grid's decode holds no more than one image's buffers
        images = torch.cat([decode_tokens(vq, one[None]).float().cpu() for one in tokens])
        vq.to(home)
        texts = {"prompts": json.dumps(self.prompts), "seeds": json.dumps(self.seeds), "step": str(step),
                 "draws": DRAWS, **self.sampling}
        pictures = to_pil(images)
        if active(self.pixel_art):  # the sprites, shown enlarged (nearest) over a checkerboard where transparent
            p = self.pixel_art
            texts["pixel_art"] = json.dumps(p)
            pictures = [shown(pixelate(im, p["grid"], palette_from_record(p), p["transparent"])) for im in pictures]
        tiles = viewable_tiles(pictures, self.prompts)  # small bases: scaled up to be seen, and labelled
        path = save_grid(tiles, out / "samples" / f"step-{step}.png", texts, nrow=v.images_per_prompt)
        log_grid(accelerator, images, tiles, step)
        return path


def pixel_art_settings(recipe: Recipe) -> dict | None:
    """What the run records about pixel art (amused_tune.sampling.pixel_art.settings_record): the validation's
    pixel_grid / palette / transparent, and the training set's colours from OUTPUT_DIR/data_report.json (what
    `palette: data` means); None when there is neither."""
    v = recipe.validation
    report = Path(recipe.output.dir) / "data_report.json"
    palette = (json.loads(report.read_text()).get("pixel_art") or {}).get("palette") if report.is_file() else None
    try:
        return settings_record(v.pixel_grid, v.palette, v.transparent, palette)
    except PixelArtError as err:
        raise RecipeError(str(err).replace("--palette", "validation.palette")) from None


BEFORE_AFTER = "before_after.png"


def grid_files(out: Path) -> list[Path]:
    """The run's validation grids `samples/step-N.png`, oldest step first."""
    found = [p for p in (Path(out) / "samples").glob("step-*.png") if p.stem.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("-", 1)[1]))


def write_before_after(out: Path) -> Path | None:
    """`samples/before_after.png`: the first validation grid (step 0, before training) beside the last (same
    prompts and seeds), with the two file names in its text chunks; None when the run wrote fewer than two grids."""
    from PIL import Image

    grids = grid_files(out)
    if len(grids) < 2:
        return None
    with Image.open(grids[0]) as a, Image.open(grids[-1]) as b:
        first, last = a.convert("RGB"), b.convert("RGB")
    gap = 8
    row = Image.new("RGB", (first.width + gap + last.width, max(first.height, last.height)), (255, 255, 255))
    row.paste(first, (0, 0))
    row.paste(last, (first.width + gap, 0))
    return save_grid([row], Path(out) / "samples" / BEFORE_AFTER, {"left": grids[0].name, "right": grids[-1].name},
                     nrow=1)


def log_grid(accelerator, images: torch.Tensor, tiles, step: int) -> None:
    """The grid's images to the run's trackers (output.log_with): TensorBoard gets the tensors, W&B the tiles."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("samples", images, step)
        elif tracker.name == "wandb":
            tracker.log_images({"samples": list(tiles)}, step=step)
