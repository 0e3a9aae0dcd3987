"""Does the toy base draw what it is asked? Sample captions of the world and classify the samples.

    python -m amused_tune.toy eval                 # 50 prompts x 2 seeds, 12 steps, guidance 10 + sweep 1,3,5,10

Sampling uses the kit's own MaskGIT sampler (`amused_tune.sampler.generate`), so this also checks the sampler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from amused_tune.models import Components
from amused_tune.toy import world
from amused_tune.toy.classify import Classification, classify

GUIDANCE_SWEEP = (1.0, 3.0, 5.0, 10.0)


def eval_prompts(n: int = 50, seed: int = 0, colours: tuple[str, ...] = world.WORLD_COLOURS) -> list[str]:
    """`n` distinct captions of the world, a fixed choice for a given seed (all of them if n is larger)."""
    captions = world.all_captions(colours)
    if n >= len(captions):
        return captions
    return random.Random(seed).sample(captions, n)


@dataclass
class MatchResult:
    rate: float  # fraction of samples whose shape, colour and background all match the caption
    shape_rate: float
    colour_rate: float
    background_rate: float
    prompts: list[str]
    seeds: list[int]
    found: list[Classification]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]

    def summary(self) -> dict:
        return {"match": self.rate, "shape": self.shape_rate, "colour": self.colour_rate,
                "background": self.background_rate, "samples": len(self.found)}


@torch.no_grad()
def match_rate(
    components: Components, prompts: list[str], seeds=(0, 1), steps: int = 12, guidance: float = 10.0, **sample_kw
) -> MatchResult:
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
        prompts=all_prompts, seeds=all_seeds, found=found, images=images,
    )


def evaluate(components: Components, n_prompts: int = 50, seeds=(0, 1), steps: int = 12,
             scales=GUIDANCE_SWEEP, print_fn=print) -> dict:
    """The acceptance numbers of the toy base: match rate at guidance 10 and the guidance sweep."""
    prompts = eval_prompts(n_prompts)
    main = match_rate(components, prompts, seeds, steps, 10.0)
    print_fn(f"caption match at guidance 10, {steps} steps, {len(prompts)} prompts x {len(seeds)} seeds: "
             f"{main.rate:.3f} (shape {main.shape_rate:.3f}, colour {main.colour_rate:.3f}, "
             f"background {main.background_rate:.3f})")
    sweep = {}
    for g in scales:
        sweep[float(g)] = main.rate if float(g) == 10.0 else match_rate(components, prompts, seeds, steps, g).rate
        print_fn(f"  guidance {g:>4}: caption match {sweep[float(g)]:.3f}")
    return {"guidance_10": main.summary(), "sweep": {str(k): v for k, v in sweep.items()},
            "prompts": len(prompts), "seeds": list(seeds), "steps": steps}
