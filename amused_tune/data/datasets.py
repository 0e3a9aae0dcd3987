"""Training datasets: what the trainer trains on, every sample validated before the first step.

`prepare_training_data` is what the trainer calls, with the data plan the preflight made (data.preflight: each
source resolved over its card and listed): every sample of every source is checked (data.checks.checked_samples;
pixel art found there) before training, and each source becomes either a `PixelDataset` (`data.cache: false`:
decoded and preprocessed on access) or a dataset of cached VQ tokens and text embeddings (data.cache); several sources are trained on as
their mixture (data.mixture), with prior-preservation images paired in (data.prior). `collate` batches items.

A dataset item is a dict:
  pixels       float [3, R, R] in [0, 1]  (R = the model's resolution)          (cache off)
  tokens       long [h, w] VQ token ids; hidden [77, D], pooled [P]           (cache on; hidden/pooled absent
                                                                                when the text encoder trains)
  prompt       str
  micro_conds  float [5]: [orig_width, orig_height, crop_top, crop_left, aesthetic score 6]
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from amused_tune.writes import write_file
from amused_tune.data import cache
from amused_tune.data.augment import Recolour, recolourings
from amused_tune.data.captions import with_caption_rules
from amused_tune.data.checks import Report, check_lengths, checked_samples, finish, load_sample, min_image_size
from amused_tune.data.mixture import Mixture, mixture_report
from amused_tune.data.pixel_art import parse_colour
from amused_tune.data.preflight import DataPlan, Part, preflight
from amused_tune.data.prior import with_prior
from amused_tune.data.preprocess import item_draws, make_prompt, preprocess
from amused_tune.data.sources import Record, Source, open_source
from amused_tune.model.bases import encode_prompts
from amused_tune.recipe import DataConfig


class PixelDataset(Dataset):
    """Validated samples, decoded and preprocessed on access (random crop and flip drawn per access)."""

    def __init__(self, source: Source, samples: list[tuple[Record, str, Recolour | None]], resolution: int,
                 cfg: DataConfig, seed: int = 0):
        self.source, self.samples, self.resolution, self.cfg = source, samples, resolution, cfg
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, rng = item_draws(key, self.rng)
        record, prompt, recolour = self.samples[index]
        image, _, grid = load_sample(self.source, record, self.cfg, 0)
        image = recolour.image(image) if recolour else image
        flip = bool(self.cfg.random_flip) and rng.random() < 0.5
        pixels, micro = preprocess(image, self.resolution, None if self.cfg.center_crop else rng, flip, grid,
                                   parse_colour(self.cfg.background))
        return {"pixels": pixels, "prompt": prompt, "micro_conds": micro}


def validated_dataset(cfg: DataConfig, resolution: int, tokenizer=None, seed: int = 0,
                      source: Source | None = None) -> tuple[PixelDataset, Report]:
    """Decode and check every sample now (cache off), so that no bad sample is met mid-run. `source`: the section's
    listing when the preflight made it."""
    source = source or open_source(cfg)
    report = Report(total=len(source.records))
    samples = []
    for record, caption, image, _ in checked_samples(source, source.records, cfg, min_image_size(cfg, resolution),
                                                     report):
        samples.append((record, make_prompt(cfg, caption), None))
        for recolour in recolourings(image, caption, record.key, cfg.colour_variants, cfg.colours):
            samples.append((record, make_prompt(cfg, recolour.caption(caption)), recolour))
    finish(report, cfg, len(samples))
    report.copies = sum(recolour is not None for _, _, recolour in samples)
    check_lengths(sorted({p for _, p, _ in samples}), tokenizer, report)
    return PixelDataset(source, samples, resolution, cfg, seed), report


def prepare_training_data(recipe, comps, accelerator, plan: DataPlan | None = None
                          ) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor]]:
    """What the trainer trains on, and the empty prompt's (hidden [1, 77, D], pooled [1, P]) on the device.

    `plan` is the data as the command's preflight resolved and listed it (data.preflight; made here when None).
    Every sample is validated here, before the first step. With `data.cache` the images are encoded to VQ tokens
    and the captions to embeddings (resuming an interrupted encoding), then the VQ model, and the text encoder
    unless it trains, are moved to the CPU. Writes OUTPUT_DIR/data_report.json. With `data.sources`, each source in
    turn, trained on as their mixture (amused_tune.data.mixture).
    """
    parts = (plan or preflight(recipe.data)).parts
    built = []
    for n, part in enumerate(parts):
        if n:  # the previous source's cache moved the encoders off the device
            comps.vqvae.to(accelerator.device)
            comps.text_encoder.to(accelerator.device)
        built.append(_one_source(recipe, part, comps, accelerator))
    empty = built[0][1]
    if len(parts) == 1:
        dataset, report = built[0][0], built[0][2].to_dict()
    else:
        dataset = Mixture([b[0] for b in built], [part.repeats for part in parts])
        report = mixture_report([b[2].to_dict() for b in built], [(part.cfg, part.repeats) for part in parts])
    path = Path(recipe.output.dir) / "data_report.json"
    if accelerator.is_main_process:
        write_file(path, json.dumps(report, indent=1) + "\n", "the data report")
    return with_prior(recipe, comps, dataset, accelerator), empty  # prior.prompts: the base's own images paired in


def _one_source(recipe, part: Part, comps, accelerator) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor], Report]:
    """The dataset of one resolved source, the empty prompt's embeddings, its validation report (logged)."""
    cfg, resolution = part.cfg, comps.resolution
    live_text = recipe.adapter.text_encoder or cfg.shuffle_tags  # no text-embedding cache
    if cfg.cache:
        with accelerator.main_process_first():
            dataset, empty, report = cache.cached_dataset(
                cfg, resolution, comps, train_text=live_text, seed=recipe.train.seed,
                show_progress=accelerator.is_main_process, source=part.source())
        comps.vqvae.to("cpu")
        if not live_text:
            comps.text_encoder.to("cpu")
        empty = tuple(t.to(accelerator.device) for t in empty)
    else:
        dataset, report = validated_dataset(cfg, resolution, comps.tokenizer, recipe.train.seed, part.source())
        empty = encode_prompts(comps.text_encoder, comps.tokenizer, [""])
    dataset = with_caption_rules(dataset, cfg)  # data.shuffle_tags
    if accelerator.is_main_process:
        report.log(Path(recipe.output.dir) / "data_report.json")
        line = report.pixel_line(cfg)  # what data.pixel_art found, in one line
        if line:
            accelerator.print(line)
    return dataset, empty, report


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], dict):  # a nested item (prior preservation's "prior")
            out[key] = collate(values)
        else:
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
