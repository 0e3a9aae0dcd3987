"""Does the toy base draw what it is asked? Sample captions of the world and classify the samples.

    python -m amused_tune.toy eval       # the toy's defaults (sampling.json), the guidance sweep, held-out colours

Sampling uses the kit's own MaskGIT sampler (`amused_tune.sampler.generate`), so this also checks the sampler.
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from amused_tune.models import Components
from amused_tune.sampling_defaults import SAMPLING_FILE, read_sampling_file
from amused_tune.toy import world
from amused_tune.toy.classify import Classification, classify

SWEEP = (1.0, 2.0, 3.0, 5.0, 10.0)
FALLBACK_DEFAULTS = {"guidance": 3.0, "guidance_schedule": "constant", "steps": 12, "temperature": [2.0, 0.0]}


def write_sampling_defaults(folder: Path, guidance: float, guidance_schedule: str = "constant", steps: int = 12,
                            temperature: tuple[float, float] = (2.0, 0.0)) -> Path:
    """Write the base's recommended sampling settings (`sampling.json`) into its pipeline folder."""
    path = Path(folder) / SAMPLING_FILE
    path.write_text(json.dumps({"guidance": float(guidance), "guidance_schedule": guidance_schedule,
                                "steps": int(steps), "temperature": [float(t) for t in temperature]}) + "\n")
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
    prompts: list[str]
    seeds: list[int]
    found: list[Classification]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]

    def summary(self) -> dict:
        return {"match": self.rate, "shape": self.shape_rate, "colour": self.colour_rate,
                "background": self.background_rate, "style": self.style_rate, "samples": len(self.found)}


def _sampler_kwargs(settings: dict) -> dict:
    """generate() keywords from sampling settings (the guidance schedule only where the sampler knows it)."""
    from amused_tune.sampler import generate

    kw = {"steps": int(settings["steps"]), "guidance": float(settings["guidance"]),
          "temperature": tuple(settings["temperature"])}
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
    from amused_tune.sampler import generate

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
        prompts=all_prompts, seeds=all_seeds, found=found, images=images,
    )


def evaluate(components: Components, n_prompts: int = 50, seeds=(0, 1), scales=SWEEP, defaults: dict | None = None,
             print_fn=print) -> dict:
    """The toy base's numbers: caption match at its sampling defaults (`defaults`; None: the best guidance > 1 of
    the sweep), the guidance sweep and the held-out colours' rate at the defaults."""
    settings = dict(defaults or FALLBACK_DEFAULTS)
    steps = int(settings["steps"])
    prompts = eval_prompts(n_prompts)
    results = {}
    for g in scales:
        results[float(g)] = match_rate(components, prompts, seeds, **_sampler_kwargs({**settings, "guidance": g}))
        print_fn(f"  guidance {g:>4}: caption match {results[float(g)].rate:.3f}")
    if defaults is None:
        settings["guidance"] = max((g for g in results if g > 1), key=lambda g: (results[g].rate, -g))
    g = float(settings["guidance"])
    main = results.get(g) or match_rate(components, prompts, seeds, **_sampler_kwargs(settings))
    held = match_rate(components, held_out_prompts(), seeds, **_sampler_kwargs(settings))
    print_fn(f"caption match at the defaults (guidance {g:g}, {settings.get('guidance_schedule', 'constant')}, "
             f"{steps} steps), {len(prompts)} prompts x {len(seeds)} seeds: {main.rate:.3f} (shape {main.shape_rate:.3f}, "
             f"colour {main.colour_rate:.3f}, background {main.background_rate:.3f})")
    print_fn(f"held-out colours drawn by the base: {held.rate:.3f} (colour {held.colour_rate:.3f})")
    if 1.0 in results:
        print_fn(f"guidance {g:g} vs 1: {main.rate:.3f} {'>=' if main.rate >= results[1.0].rate else '<'} "
                 f"{results[1.0].rate:.3f}; at the defaults {'>=' if main.rate >= 0.9 else '<'} 0.90")
    return {"defaults": settings, "at_defaults": main.summary(), "sweep": {str(k): r.rate for k, r in results.items()},
            "held_out": held.summary(), "prompts": len(prompts), "seeds": list(seeds)}
