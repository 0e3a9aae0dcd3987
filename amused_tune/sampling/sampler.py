"""MaskGIT decoding for aMUSEd: text-to-image, image variation, inpainting, LoRA and StyleDrop guidance.

The loop (`sample_tokens`): start from all-masked tokens (or an image's VQ tokens with some of them masked); at each
of T steps predict every masked token, sample it, then re-mask the least confident of the newly sampled tokens so
that a fraction gamma((i + 1) / T) of the starting masked count stays masked (gamma = cos(r * pi / 2), or 1 - r).
Confidence is log p(sampled token) plus Gumbel noise whose temperature falls linearly over the steps ((2, 0) by
default). How a step's logits are made (no guidance, classifier-free guidance with a schedule, StyleDrop) is a
small strategy from `amused_tune.sampling.guidance`.

Truncation (`min_p`, `top_k`; off by default, as in diffusers): before a token is drawn, codes less likely than
min_p times the most likely code, and all but the top_k most likely, get probability 0 (the rest renormalised).
A model trained with label smoothing puts a little mass on every code; drawn from the full distribution over
every cell, some cell of most images gets a stray code. Truncation keeps the draws to the codes the model means.

Randomness: each image has its own CPU `torch.Generator`, and every random number of that image comes from it, in a
fixed order, so an image depends on its prompt and seed only, not on the rest of the batch. Two ways to draw:

- ``draws="auto"`` (default): the fast draws on CUDA, the exact ones elsewhere (`resolve_draws`).
- ``draws="exact"`` draws exactly what diffusers' `AmusedScheduler` draws from a CPU generator
  (``torch.multinomial`` = argmax of p / Exp(1) noise over the whole codebook, then the Gumbel uniforms), so at
  batch 1 with fp32 logits the tokens equal `AmusedPipeline(..., generator=torch.Generator().manual_seed(seed))`.
  It costs N x V exponentials per image and step on the CPU (2M at amused-256).
- ``draws="fast"`` samples by inverse CDF from one uniform per token and draws all of an image's uniforms up
  front: one small host-to-device copy per call, nothing per step. Same distribution, different images.

The loop never waits on the device: per-step numbers are Python floats computed before it, shapes are static, and
draws do not depend on model outputs (exact draws are made on the CPU while the device runs the previous step).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from amused_tune.sampling.guidance import (  # noqa: F401  (StyleDropGuidance, adapters_disabled: part of this API)
    Embeds,
    Passes,
    SampleError,
    StyleDropGuidance,
    expand_batch,
    adapters_disabled,
    choose_guidance,
)
from amused_tune.sampling.images import load_image, mask_to_grid, png_info, save_grid, to_pil  # noqa: F401  (this API)
from amused_tune.model.masking import SCHEDULES
from amused_tune.model.bases import Components, decode_tokens, encode_images, encode_prompts, micro_conditioning

DRAWS = ("auto", "exact", "fast")


def resolve_draws(draws: str, device: torch.device) -> str:
    """"auto": the fast draws on CUDA (where the exact ones, made on the CPU, would hold the GPU up), the exact
    ones elsewhere; "exact" and "fast" as asked."""
    if draws not in DRAWS:
        raise SampleError(f"draws must be one of {DRAWS}, got {draws!r}")
    return ("fast" if device.type == "cuda" else "exact") if draws == "auto" else draws


# --------------------------------------------------------------------------------------------- schedule


def step_plan(
    steps: int, schedule: str = "cosine", temperature: float | Sequence[float] = (2.0, 0.0)
) -> tuple[list[float], list[float]]:
    """Per step i: (fraction of the starting masked tokens still masked after step i, Gumbel temperature of step i).

    Computed in fp32 exactly as diffusers' `AmusedScheduler` does, so that token counts match bit for bit. A single
    `temperature` t means (t, 0.01), as in diffusers.
    """
    if steps < 1:
        raise SampleError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise SampleError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    t0, t1 = (float(temperature), 0.01) if isinstance(temperature, (int, float)) else map(float, temperature)
    ratios = [float(SCHEDULES[schedule]((torch.tensor([[i]]) + 1) / steps)) for i in range(steps)]
    return ratios, torch.linspace(t0, t1, steps).tolist()


def start_step(steps: int, strength: float) -> int:
    """Index of the first step run for `strength`: the last round(strength * steps) steps run (>= 1 if strength > 0)."""
    if not 0.0 <= strength <= 1.0:
        raise SampleError(f"strength must be in [0, 1], got {strength}")
    run = 0 if strength == 0 else min(steps, max(1, round(strength * steps)))
    return steps - run


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from U(0, 1) draws, clamped as diffusers does."""
    return -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))


def make_generators(seeds: Sequence[int | torch.Generator]) -> list[torch.Generator]:
    """One CPU generator per image (an int seed, or a CPU generator passed through)."""
    gens = [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(int(s)) for s in seeds]
    if any(g.device.type != "cpu" for g in gens):
        raise SampleError("generators must live on the CPU (draws are made there, then copied)")
    return gens


def check_truncation(min_p: float, top_k: int) -> None:
    """Raise SampleError unless 0 <= min_p < 1 and top_k is an integer >= 0 (0: off)."""
    if not (isinstance(min_p, (int, float)) and 0.0 <= min_p < 1.0):
        raise SampleError(f"min_p must be in [0, 1) (0: off), got {min_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SampleError(f"top_k must be an integer >= 0 (0: off), got {top_k}")


def truncate(probs: torch.Tensor, min_p: float = 0.0, top_k: int = 0) -> torch.Tensor:
    """`probs` [..., V] without the unlikely codes: those under min_p x the most likely code's probability and
    all but the top_k most likely (ties kept) get 0, and the rest is renormalised. Both off: `probs` itself."""
    if min_p <= 0.0 and (top_k <= 0 or top_k >= probs.shape[-1]):
        return probs
    keep = torch.ones_like(probs, dtype=torch.bool)
    if min_p > 0.0:
        keep &= probs >= min_p * probs.amax(-1, keepdim=True)
    if 0 < top_k < probs.shape[-1]:
        keep &= probs >= probs.topk(top_k, -1).values[..., -1:]
    kept = torch.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------- compile, threads


def compiled(transformer: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` of the U-ViT (static shapes), made once per module and kept on it."""
    if "_amused_compiled" not in transformer.__dict__:  # not a submodule: no cycle in .modules()
        transformer.__dict__["_amused_compiled"] = torch.compile(transformer, dynamic=False)
    return transformer.__dict__["_amused_compiled"]


@contextmanager
def cpu_threads_for(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """One intra-op thread while a small U-ViT (under 20M weights: tiny, toy) samples on the CPU: its ops are too
    small to gain from more, and on a busy machine OpenMP threads wait on each other (measured with the 2 cores
    shared: 8 toy images in 2.6 s on 1 thread, 62 s on 2). The thread count is restored afterwards."""
    before = torch.get_num_threads()
    small = device.type == "cpu" and before > 1 and sum(p.numel() for p in model.parameters()) < 20_000_000
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- the loop


class _Draws:
    """Each image's random numbers for the steps, from its own generator (see the module docstring)."""

    def __init__(self, kind: str, gens: list[torch.Generator], steps: int, n: int, device: torch.device):
        self.kind, self.gens, self.device = kind, gens, device
        if kind == "fast":  # all uniforms up front: [B, steps, 2, N] (sampling, Gumbel)
            pre = torch.stack([torch.rand(steps, 2, n, generator=g) for g in gens])
            self.pre = pre.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else pre.to(device)

    def __call__(self, probs: torch.Tensor, k: int, last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sampled tokens [B, N] from probs [B, N, V], Gumbel uniforms [B, N] or None at the last step)."""
        b, n, v = probs.shape
        if self.kind == "fast":
            cdf = probs.cumsum(-1)
            u = self.pre[:, k, 0, :, None] * cdf[..., -1:]
            return torch.searchsorted(cdf, u, right=True)[..., 0].clamp(max=v - 1), self.pre[:, k, 1]
        q = torch.empty(b, n, v)  # what torch.multinomial(probs, 1, g) draws, then the Gumbel uniforms
        for j, g in enumerate(self.gens):
            q[j].exponential_(generator=g)
        sampled = (probs / q.to(self.device, non_blocking=True)).argmax(-1)
        if last:
            return sampled, None
        noise = torch.empty(b, n)
        for j, g in enumerate(self.gens):
            noise[j].uniform_(0, 1, generator=g)
        return sampled, noise.to(self.device, non_blocking=True)


def _start_tokens(
    init_tokens: torch.Tensor | None, region: torch.Tensor | None, gens: list[torch.Generator], n: int,
    mask_id: int, device: torch.device, masked_share: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, N] to start from, per image the count of tokens the schedule is relative to [B, 1]).

    Text-to-image: all masked. From `init_tokens`: the `region` (default all) masked at `masked_share` 1.0,
    else a random floor(count * masked_share) of it, drawn from each image's generator.
    """
    b = len(gens)
    if init_tokens is None:
        return torch.full((b, n), mask_id, dtype=torch.long, device=device), torch.full((b, 1), float(n), device=device)
    x = expand_batch(init_tokens.to(device).long().reshape(-1, n), b).clone()
    region_flat = torch.ones(b, n, dtype=torch.bool, device=device) if region is None else (
        expand_batch(region.to(device).bool().reshape(-1, n), b)
    )
    count = region_flat.sum(-1, keepdim=True).float()
    if masked_share == 1.0:
        return torch.where(region_flat, mask_id, x), count
    if masked_share > 0.0:
        scores = torch.stack([torch.rand(n, generator=g) for g in gens]).to(device, non_blocking=True)
        rank = torch.where(region_flat, scores, 2.0).argsort(-1).argsort(-1)
        x = torch.where(rank < (count * masked_share).floor().long(), mask_id, x)
    return x, count


def _decode_step(x: torch.Tensor, logits: torch.Tensor, draws: _Draws, k: int, last: bool, temperature: float,
                 keep_share: float, count: torch.Tensor, mask_id: int, truncation: tuple[float, int] = (0.0, 0),
                 ) -> torch.Tensor:
    """One MaskGIT step: sample every masked token (from the `truncation` (min_p, top_k) of its distribution),
    then re-mask all but the most confident of them so that floor(count * keep_share) stay masked (at least 1,
    fewer than were masked); the last step keeps them all."""
    b, v = logits.shape[:2]
    n = x.shape[1]
    probs = logits.reshape(b, v, n).permute(0, 2, 1).softmax(-1)  # [B, N, V], the layout diffusers uses
    probs = truncate(probs, *truncation)
    sampled, noise = draws(probs, k, last)
    unknown = x == mask_id
    pred = torch.where(unknown, sampled, x)
    if last:
        return pred
    picked = probs.gather(-1, pred[..., None])[..., 0]
    conf = torch.log(picked.clamp(1e-20)) + temperature * gumbel(noise)
    conf = torch.where(unknown, conf, math.inf)
    keep_masked = (count * keep_share).floor().long()
    keep_masked = torch.minimum(unknown.sum(-1, keepdim=True) - 1, keep_masked).clamp(min=1)
    cutoff = conf.sort(-1).values.gather(-1, keep_masked.clamp(max=n - 1))
    return torch.where(conf < cutoff, mask_id, pred)


@torch.no_grad()
def sample_tokens(
    transformer: torch.nn.Module,
    cond: Embeds,
    uncond: Embeds | None,
    seeds: Sequence[int | torch.Generator],
    *,
    micro_conds: torch.Tensor,
    steps: int = 12,
    guidance: float = 10.0,
    guidance_schedule: str = "constant",
    schedule: str = "cosine",
    temperature: float | Sequence[float] = (2.0, 0.0),
    init_tokens: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    strength: float = 1.0,
    styledrop: StyleDropGuidance | tuple[float, float] | None = None,
    draws: str = "auto",
    grid: tuple[int, int] | None = None,
    min_p: float = 0.0,
    top_k: int = 0,
) -> torch.Tensor:
    """Generate VQ tokens [B, h, w] from precomputed text embeddings (no text encoder or VQ model needed).

    cond / uncond: (hidden [B or 1, L, D], pooled [B or 1, P]); uncond may be None when guidance <= 1 and no
    StyleDrop. seeds: one per image. micro_conds: [5] or [B, 5] (`models.micro_conditioning`).
    guidance_schedule: how the guidance scale moves over the steps (`guidance.GUIDANCE_SCHEDULES`).
    init_tokens [B or 1, h, w]: start from these tokens (variation / inpainting) instead of all masked.
    region bool [B or 1, h, w]: the tokens that may be regenerated (default: all); others are returned unchanged.
    strength: run the last round(strength * steps) steps, masking the share of `region` the schedule has masked
    at that point (1.0: all of it, like text-to-image; 0.0: returns init_tokens).
    styledrop: StyleDropGuidance or (lambda_a, lambda_b), replaces `guidance`.
    min_p, top_k: truncation of each token's distribution before it is drawn (see the module docstring; 0: off).
    """
    check_truncation(min_p, top_k)
    if draws not in DRAWS:
        raise SampleError(f"draws must be one of {DRAWS}, got {draws!r}")
    if region is not None and init_tokens is None:
        raise SampleError("region (an inpainting mask) needs init_tokens to keep outside it")
    ratios, temps = step_plan(steps, schedule, temperature)
    strategy = choose_guidance(guidance, steps, guidance_schedule, styledrop)
    if strategy.needs_uncond and uncond is None:
        raise SampleError("guidance needs uncond embeddings (encode the negative or empty prompt)")
    base = getattr(transformer, "_orig_mod", transformer)
    mask_id = int(base.config.vocab_size) - 1
    device = next(base.parameters()).device
    gens = make_generators(seeds)
    h, w = tuple(init_tokens.shape[-2:]) if init_tokens is not None else grid or (int(base.config.sample_size),) * 2
    first = start_step(steps, strength) if init_tokens is not None else 0
    passes = Passes(transformer, cond, uncond, micro_conds, (h, w), len(gens), device)
    share = 1.0 if first == 0 else 0.0 if first == steps else ratios[first - 1]  # masked at the start
    x, count = _start_tokens(init_tokens, region, gens, h * w, mask_id, device, share)
    if first == steps:
        return x.reshape(-1, h, w)
    draw = _Draws(resolve_draws(draws, device), gens, steps - first, h * w, device)
    was_training = base.training
    base.eval()
    try:
        with cpu_threads_for(base, device):
            for i in range(first, steps):
                logits = strategy.logits(passes, x, i)
                x = _decode_step(x, logits, draw, i - first, i == steps - 1, temps[i], ratios[i], count, mask_id,
                                 (min_p, top_k))
    finally:
        base.train(was_training)
    return x.reshape(-1, h, w)


# --------------------------------------------------------------------------------------------- generate


def encode_texts(components: Components, texts: Sequence[str]) -> Embeds:
    """Encode texts, each distinct one once (one batch), and index them back: (hidden [B, L, D], pooled [B, P])."""
    unique = list(dict.fromkeys(texts))
    hidden, pooled = encode_prompts(components.text_encoder, components.tokenizer, unique)
    idx = torch.tensor([unique.index(t) for t in texts], device=hidden.device)
    return hidden[idx], pooled[idx]


_EMPTY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def empty_prompt_embeds(components: Components) -> Embeds:
    """The empty prompt's embeddings [1, ...], computed once per text encoder and recomputed only when its
    weights change (moved, cast, adapters added, or updated in place by an optimizer)."""
    enc = components.text_encoder
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in enc.parameters())
    hit = _EMPTY.get(enc)
    if hit is None or hit[0] != key:
        hit = (key, encode_prompts(enc, components.tokenizer, [""]))
        _EMPTY[enc] = hit
    return hit[1]


@torch.no_grad()
def generate(
    components: Components,
    prompts: Sequence[str] | None,
    seeds: Sequence[int | torch.Generator],
    *,
    steps: int = 12,
    guidance: float = 10.0,
    guidance_schedule: str = "constant",
    negative_prompt: str | Sequence[str] | None = None,
    schedule: str = "cosine",
    temperature: float | Sequence[float] = (2.0, 0.0),
    image: str | Path | Image.Image | torch.Tensor | None = None,
    strength: float = 1.0,
    mask: str | Path | Image.Image | torch.Tensor | None = None,
    prompt_embeds: Embeds | None = None,
    styledrop: StyleDropGuidance | tuple[float, float] | None = None,
    draws: str = "auto",
    min_p: float = 0.0,
    top_k: int = 0,
    aesthetic_score: float = 6.0,
    crop: tuple[int, int] = (0, 0),
    torch_compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-to-image, image variation (`image`, `strength`) or inpainting (`image` + `mask`, white = regenerate).

    One image per seed; a single prompt is used for every seed. `prompt_embeds` (hidden, pooled) replaces encoding
    `prompts`. `guidance_schedule`: constant, linear, cosine or ramp1 (`amused_tune.sampling.guidance`). `min_p`, `top_k`:
    truncate each token's distribution before drawing (0: off; see the module docstring). The defaults are
    diffusers'; `resolve_sampling(base, ...)` gives a base's own (its sampling.json). Returns (tokens [B, h, w],
    images [B, 3, H, W] in [0, 1]).
    """
    b = len(seeds)
    if prompt_embeds is None:
        if not prompts:
            raise SampleError("pass prompts or prompt_embeds")
        prompts = list(prompts) * b if len(prompts) == 1 else list(prompts)
        if len(prompts) != b:
            raise SampleError(f"{len(prompts)} prompts for {b} seeds: pass one prompt or one per seed")
    if mask is not None and image is None:
        raise SampleError("inpainting needs the image to paint into: pass image= with mask=")
    negatives = [negative_prompt or ""] * b if isinstance(negative_prompt, (str, type(None))) else list(negative_prompt)
    with cpu_threads_for(components.transformer, next(components.transformer.parameters()).device):
        cond = prompt_embeds if prompt_embeds is not None else encode_texts(components, prompts)
        uncond = None
        if choose_guidance(guidance, steps, guidance_schedule, styledrop).needs_uncond:
            uncond = empty_prompt_embeds(components) if not any(negatives) else encode_texts(components, negatives)
        res = components.resolution
        init = region = None
        if image is not None:
            init = encode_images(components.vqvae, load_image(image, res))
            if mask is not None:
                region = mask_to_grid(mask, tuple(init.shape[-2:]))
        transformer = compiled(components.transformer) if torch_compile else components.transformer
        tokens = sample_tokens(
            transformer, cond, uncond, seeds,
            micro_conds=micro_conditioning(res, res, crop[0], crop[1], aesthetic_score),
            steps=steps, guidance=guidance, guidance_schedule=guidance_schedule, schedule=schedule,
            temperature=temperature, init_tokens=init, region=region, strength=strength, styledrop=styledrop,
            draws=draws, min_p=min_p, top_k=top_k,
        )
        return tokens, decode_tokens(components.vqvae, tokens)
