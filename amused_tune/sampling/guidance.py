"""Guidance for MaskGIT decoding: how one step's logits are made from the U-ViT's passes.

Each kind of guidance is a small object with ``logits(passes, tokens, step)``; the sampler's loop calls it once
per step and never needs to know which kind it holds:

- `NoGuidance`: the conditional logits.
- `ClassifierFree`: uncond + s_i (cond - uncond), with one scale s_i per step from a guidance schedule.
  The uncond and cond passes run as one batch [uncond; cond], the order diffusers uses.
- `StyleDropGuidance`: adapter + lambda_a (adapter - base) + lambda_b (base - uncond), from the model with its
  LoRA adapters on ("adapter") and off ("base" conditional, "uncond" unconditional).

Guidance schedules (`guidance_scales`), for step i of T with peak scale g:

- ``constant``: g at every step (diffusers' `AmusedPipeline`, bit for bit).
- ``linear``: g i / (T - 1), from 0 at the first step to g at the last (open-muse's `generate2`).
- ``cosine``: g cos((1 - (i + 1) / T) pi / 2) = g sin((i + 1) / T pi / 2), which follows the masking schedule
  (the mask ratio after step i is cos((i + 1) / T pi / 2)) and reaches g at the last step (open-muse's `generate2`,
  which also floors each scale to an integer; the kit keeps the fraction so that non-integer scales work).
- ``ramp1``: 1 + (g - 1) i / (T - 1), from no guidance (1) to g.

With a single step the ramps give g. Classifier-free guidance is on when g > 1, whatever the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from amused_tune.common import GUIDANCE_SCHEDULES

Embeds = tuple[torch.Tensor, torch.Tensor]  # (penultimate hidden states [B, L, D], pooled projection [B, P])


class SampleError(ValueError):
    """Sampling arguments that cannot work together; the message says what to change."""


def guidance_scales(guidance: float, steps: int, schedule: str = "constant") -> list[float]:
    """The classifier-free guidance scale of each of `steps` steps (see the module docstring)."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise SampleError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")
    g = float(guidance)
    last = max(steps - 1, 1)
    if schedule == "constant":
        return [g] * steps
    if schedule == "linear":
        return [g * i / last if steps > 1 else g for i in range(steps)]
    if schedule == "cosine":
        return [g * math.cos((1 - (i + 1) / steps) * math.pi / 2) for i in range(steps)]
    return [1 + (g - 1) * i / last if steps > 1 else g for i in range(steps)]


# --------------------------------------------------------------------------------------------- the passes


class Passes:
    """The U-ViT bound to one batch's conditioning: `cond(tokens)` and `pair(tokens)` -> fp32 logits [B, V, h, w].

    Embeddings of batch 1 are expanded to the batch; the [uncond; cond] batch is built once, here.
    """

    def __init__(self, transformer: torch.nn.Module, cond: Embeds, uncond: Embeds | None, micro_conds: torch.Tensor,
                 grid: tuple[int, int], batch: int, device: torch.device):
        self.transformer = transformer
        self.model = getattr(transformer, "_orig_mod", transformer)  # the module itself under torch.compile
        self.grid = grid
        self.hidden, self.pooled = (expand_batch(t.to(device), batch) for t in cond)
        dtype = self.hidden.dtype
        self.micro = expand_batch(micro_conds.to(device, dtype).reshape(-1, 5), batch)
        self.paired = None
        if uncond is not None:
            u_hidden, u_pooled = (expand_batch(t.to(device, dtype), batch) for t in uncond)
            self.paired = (torch.cat([u_hidden, self.hidden]), torch.cat([u_pooled, self.pooled]),
                           self.micro.repeat(2, 1))

    def cond(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.reshape(-1, *self.grid)
        return self.transformer(t, micro_conds=self.micro, pooled_text_emb=self.pooled,
                                encoder_hidden_states=self.hidden).float()

    def pair(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond logits, cond logits) from one forward pass over [uncond; cond]."""
        if self.paired is None:
            raise SampleError("guidance needs uncond embeddings (encode the negative or empty prompt)")
        hidden, pooled, micro = self.paired
        t = tokens.reshape(-1, *self.grid)
        out = self.transformer(t.repeat(2, 1, 1), micro_conds=micro, pooled_text_emb=pooled,
                               encoder_hidden_states=hidden).float()
        return out.chunk(2)


def expand_batch(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] == 1 and b > 1 else t


# --------------------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class NoGuidance:
    """The conditional logits as they are."""

    needs_uncond = False

    def logits(self, passes: Passes, tokens: torch.Tensor, step: int) -> torch.Tensor:
        return passes.cond(tokens)


@dataclass(frozen=True)
class ClassifierFree:
    """uncond + scales[step] * (cond - uncond)."""

    scales: tuple[float, ...]
    needs_uncond = True

    @staticmethod
    def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        return uncond + scale * (cond - uncond)

    def logits(self, passes: Passes, tokens: torch.Tensor, step: int) -> torch.Tensor:
        uncond, cond = passes.pair(tokens)
        return self.combine(uncond, cond, self.scales[step])


@dataclass(frozen=True)
class StyleDropGuidance:
    """StyleDrop's two-model guidance: adapter + lambda_a * (adapter - base) + lambda_b * (base - uncond).

    "adapter" is the conditional logits with the LoRA adapters on, "base" and "uncond" the conditional and
    unconditional logits of the base model (adapters off). Needs unmerged adapters; replaces `guidance` (and its
    schedule).
    """

    lambda_a: float
    lambda_b: float
    needs_uncond = True

    def combine(self, adapter: torch.Tensor, base: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return adapter + self.lambda_a * (adapter - base) + self.lambda_b * (base - uncond)

    def logits(self, passes: Passes, tokens: torch.Tensor, step: int) -> torch.Tensor:
        with adapters_disabled(passes.model):
            uncond, base = passes.pair(tokens)
        return self.combine(passes.cond(tokens), base, uncond)


Guidance = NoGuidance | ClassifierFree | StyleDropGuidance


def choose_guidance(guidance: float, steps: int, schedule: str = "constant",
                    styledrop: StyleDropGuidance | tuple[float, float] | None = None) -> Guidance:
    """StyleDrop guidance if given, else classifier-free guidance when `guidance` > 1, else none."""
    scales = guidance_scales(guidance, steps, schedule)  # checks the schedule's name in every case
    if styledrop is not None:
        return styledrop if isinstance(styledrop, StyleDropGuidance) else StyleDropGuidance(*styledrop)
    return ClassifierFree(tuple(scales)) if guidance > 1.0 else NoGuidance()


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` as its base model: every (unmerged) peft adapter layer off, requires_grad left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise SampleError("StyleDrop guidance needs LoRA adapters that are loaded and not merged into the model")
    grads = {p: p.requires_grad for p in model.parameters()}
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, off in zip(layers, was_disabled):
            layer.enable_adapters(not off)
        for p, g in grads.items():
            p.requires_grad_(g)
