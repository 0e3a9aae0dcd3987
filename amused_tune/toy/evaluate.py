"""Does the toy base draw what it is asked? Sample captions of the world and classify the samples.

    python -m amused_tune.toy eval       # the toy's defaults (sampling.json), the guidance sweep, held-out colours,
                                         # framed captions, the clean share (no stray cell)

Sampling uses the kit's own MaskGIT sampler (`amused_tune.sampling.sampler.generate`), so this also checks the sampler.
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from amused_tune.model.bases import Components
from amused_tune.model.sampling_defaults import SAMPLING_FILE, read_sampling_file
from amused_tune.toy import world
from amused_tune.toy.classify import Classification, classify, is_clean

SWEEP = (1.0, 2.0, 3.0, 5.0, 10.0)
FALLBACK_DEFAULTS = {"guidance": 3.0, "guidance_schedule": "constant", "steps": 12, "temperature": [2.0, 0.0],
                     "min_p": 0.0, "top_k": 0}
TOY_MIN_P = 0.1  # the toy's truncation: label smoothing's mass on every code is never drawn (see docs/toy.md)


def write_sampling_defaults(folder: Path, guidance: float, guidance_schedule: str = "constant", steps: int = 12,
                            temperature: tuple[float, float] = (2.0, 0.0), min_p: float = 0.0, top_k: int = 0) -> Path:
    """Write the base's recommended sampling settings (`sampling.json`) into its pipeline folder."""
    path = Path(folder) / SAMPLING_FILE
    path.write_text(json.dumps({"guidance": float(guidance), "guidance_schedule": guidance_schedule,
                                "steps": int(steps), "temperature": [float(t) for t in temperature],
                                "min_p": float(min_p), "top_k": int(top_k)}) + "\n")
    return path


def read_sampling_defaults(folder: Path) -> dict:
    """The base's `sampling.json`, read and checked by the kit (missing keys or file: `FALLBACK_DEFAULTS`)."""
    path = Path(folder) / SAMPLING_FILE
    found = read_sampling_file(path) if path.is_file() else {}
    return {**FALLBACK_DEFAULTS, **found}


def eval_prompts(n: int = 50, seed: int = 0, colours: tuple[str, ...] = world.WORLD_COLOURS) -> list[str]:
    """`n` distinct captions of the world, a fixed choice for a given seed (all of them if n is larger)."""
    captions = world.all_captions(colours)
    if n >= len(captions):
        return captions
    return random.Random(seed).sample(captions, n)


def framed_prompts(n: int = 50, seed: int = 0) -> list[str]:
    """`n` distinct framed captions of the world ("... with a green frame"), a fixed choice for a given seed."""
    captions = [world.caption(s) for s in world.framed_specs()]
    return random.Random(seed).sample(captions, min(n, len(captions)))


def clean_rate(images) -> float:
    """Share of `images` that are clean: cell for cell the world's rendering of what the classifier read
    (`classify.is_clean`: no stray cell anywhere). Works for any sample of the toy world, adapters' included."""
    images = list(images)
    return sum(is_clean(im) for im in images) / max(len(images), 1)


def held_out_prompts(n: int = 20, seed: int = 0) -> list[str]:
    """Captions of a held-out colour's shape on a world-colour background."""
    triples = [(s, c, b) for s in world.SHAPES for c in world.HELD_OUT_COLOURS for b in world.WORLD_COLOURS]
    picked = random.Random(seed).sample(triples, min(n, len(triples)))
    return [world.caption(world.ShapeSpec(*t)) for t in picked]


@dataclass
class MatchResult:
    rate: float  # fraction of samples whose shape, colour and background all match the caption
    shape_rate: float
    colour_rate: float
    background_rate: float
    style_rate: float  # fraction of samples that show the [v] style's frame
    frame_rate: float  # fraction whose frame is the one the caption asks for (none, a colour, grey for the style)
    clean_rate: float  # fraction that are clean (`clean_rate`: no stray cell)
    prompts: list[str]
    seeds: list[int]
    found: list[Classification]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]

    def summary(self) -> dict:
        return {"match": self.rate, "shape": self.shape_rate, "colour": self.colour_rate,
                "background": self.background_rate, "style": self.style_rate, "frame": self.frame_rate,
                "clean": self.clean_rate, "samples": len(self.found)}

    @property
    def framed_match(self) -> float:
        """Fraction of samples with the caption's shape, colour, background and frame."""
        return sum(f.matches_with_frame(p) for f, p in zip(self.found, self.prompts)) / max(len(self.found), 1)


def _sampler_kwargs(settings: dict) -> dict:
    """generate() keywords from sampling settings (the guidance schedule only where the sampler knows it)."""
    from amused_tune.sampling.sampler import generate

    kw = {"steps": int(settings["steps"]), "guidance": float(settings["guidance"]),
          "temperature": tuple(settings["temperature"]), "min_p": float(settings.get("min_p", 0.0)),
          "top_k": int(settings.get("top_k", 0))}
    schedule = settings.get("guidance_schedule", "constant")
    if "guidance_schedule" in inspect.signature(generate).parameters:
        kw["guidance_schedule"] = schedule
    elif schedule != "constant":
        raise ValueError(f"this sampler has no guidance schedules; {schedule!r} cannot be used")
    return kw


@torch.no_grad()
def match_rate(components: Components, prompts: list[str], seeds=(0, 1), steps: int = 12, guidance: float = 3.0,
               **sample_kw) -> MatchResult:
    """Sample every prompt with every seed (the kit's sampler) and classify each image against its caption."""
    from amused_tune.sampling.sampler import generate

    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    _, images = generate(components, all_prompts, all_seeds, steps=steps, guidance=guidance, **sample_kw)
    found = [classify(im) for im in images]
    wanted = [world.parse_caption(p) for p in all_prompts]
    n = max(len(found), 1)
    return MatchResult(
        rate=sum(f.matches(p) for f, p in zip(found, all_prompts)) / n,
        shape_rate=sum(f.shape == w[0] for f, w in zip(found, wanted)) / n,
        colour_rate=sum(f.colour == w[1] for f, w in zip(found, wanted)) / n,
        background_rate=sum(f.background == w[2] for f, w in zip(found, wanted)) / n,
        style_rate=sum(f.style for f in found) / n,
        frame_rate=sum(f.frame == world.caption_frame(p) for f, p in zip(found, all_prompts)) / n,
        clean_rate=sum(is_clean(im, f) for im, f in zip(images, found)) / n,
        prompts=all_prompts, seeds=all_seeds, found=found, images=images,
    )


def evaluate(components: Components, n_prompts: int = 50, seeds=(0, 1), scales=SWEEP, defaults: dict | None = None,
             print_fn=print) -> dict:
    """The toy base's numbers: caption match at its sampling defaults (`defaults`; None: the best guidance > 1 of
    the sweep, truncated at `TOY_MIN_P`), the guidance sweep, the held-out colours and the framed captions at the
    defaults, and the clean share at the defaults with and without truncation."""
    settings = {**FALLBACK_DEFAULTS, **(defaults or {"min_p": TOY_MIN_P})}
    prompts = eval_prompts(n_prompts)
    results = {}
    for g in scales:
        results[float(g)] = match_rate(components, prompts, seeds, **_sampler_kwargs({**settings, "guidance": g}))
        print_fn(f"  guidance {g:>4}: caption match {results[float(g)].rate:.3f}, clean {results[float(g)].clean_rate:.3f}")
    if defaults is None:
        settings["guidance"] = max((g for g in results if g > 1), key=lambda g: (results[g].rate, -g))
    g = float(settings["guidance"])
    main = results.get(g) or match_rate(components, prompts, seeds, **_sampler_kwargs(settings))
    held = match_rate(components, held_out_prompts(), seeds, **_sampler_kwargs(settings))
    framed = match_rate(components, framed_prompts(n_prompts), seeds, **_sampler_kwargs(settings))
    untruncated = match_rate(components, prompts, seeds, **_sampler_kwargs({**settings, "min_p": 0.0, "top_k": 0}))
    _print_numbers(print_fn, settings, len(prompts), seeds, main, held, framed, untruncated, results.get(1.0))
    return {"defaults": settings, "at_defaults": main.summary(), "sweep": {str(k): r.rate for k, r in results.items()},
            "sweep_clean": {str(k): r.clean_rate for k, r in results.items()}, "held_out": held.summary(),
            "framed": {**framed.summary(), "match_with_frame": framed.framed_match},
            "clean_without_truncation": untruncated.clean_rate, "prompts": len(prompts), "seeds": list(seeds)}


def _print_numbers(print_fn, settings: dict, n_prompts: int, seeds, main: MatchResult, held: MatchResult,
                   framed: MatchResult, untruncated: MatchResult, at_one: MatchResult | None) -> None:
    g = float(settings["guidance"])
    print_fn(f"caption match at the defaults (guidance {g:g}, {settings.get('guidance_schedule', 'constant')}, "
             f"{settings['steps']} steps, min_p {settings['min_p']:g}, top_k {settings['top_k']}), {n_prompts} prompts "
             f"x {len(seeds)} seeds: {main.rate:.3f} (shape {main.shape_rate:.3f}, colour {main.colour_rate:.3f}, "
             f"background {main.background_rate:.3f}; no frame drawn {main.frame_rate:.3f})")
    print_fn(f"clean samples (no stray cell) at the defaults: {main.clean_rate:.3f} "
             f"{'>=' if main.clean_rate >= 0.9 else '<'} 0.90; without truncation (min_p 0, top_k 0): "
             f"{untruncated.clean_rate:.3f}")
    print_fn(f"framed captions: shape, colour, background and frame {framed.framed_match:.3f} (frame {framed.frame_rate:.3f}, "
             f"caption without the frame {framed.rate:.3f}, clean {framed.clean_rate:.3f})")
    print_fn(f"held-out colours drawn by the base: {held.rate:.3f} (colour {held.colour_rate:.3f})")
    if at_one is not None:
        print_fn(f"guidance {g:g} vs 1: {main.rate:.3f} {'>=' if main.rate >= at_one.rate else '<'} "
                 f"{at_one.rate:.3f}; at the defaults {'>=' if main.rate >= 0.9 else '<'} 0.90")
