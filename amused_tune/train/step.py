"""One optimizer step: `grad_accum` micro-batches of the MaskGIT objective (mask tokens, drop the text of some
samples, cross-entropy on the masked tokens), then clip and update. `compute_loss` is the one place the objective
is called from."""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass

import torch

from amused_tune.masking import mask_tokens, masked_cross_entropy
from amused_tune.models import Components, encode_images, encode_prompts, text_conditioning
from amused_tune.recipe import Recipe
from amused_tune.train.stops import TrainingStopped, nonfinite_message


@dataclass
class Conditioning:
    """Text conditioning of a batch: CLIP penultimate hidden states and pooled projection."""

    hidden: torch.Tensor
    pooled: torch.Tensor


def draw_dropout(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which of n samples lose their text (probability p each), drawn one sample at a time so that a sample's
    draw does not depend on the batch size."""
    return torch.cat([torch.rand(1, generator=generator) for _ in range(n)]) < p


def batch_conditioning(
    batch: dict, comps: Components, empty: Conditioning, drop: torch.Tensor, train_text: bool, device
) -> Conditioning:
    """Text conditioning of a batch, with dropped samples given the empty prompt's hidden states and pooled."""
    if train_text:  # the text encoder learns: encode with gradients, dropped samples as the empty prompt
        prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
        ids = comps.tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
        return Conditioning(*text_conditioning(comps.text_encoder, comps.tokenizer, ids.to(device)))
    if "hidden" in batch:
        hidden, pooled = batch["hidden"].to(device), batch["pooled"].to(device)
    else:
        hidden, pooled = encode_prompts(comps.text_encoder, comps.tokenizer, batch["prompt"])
    d = drop.to(device)
    hidden = torch.where(d[:, None, None], empty.hidden.to(hidden.dtype), hidden)
    pooled = torch.where(d[:, None], empty.pooled.to(pooled.dtype), pooled)
    return Conditioning(hidden, pooled)


def compute_loss(
    batch: dict, transformer, comps: Components, empty: Conditioning, recipe: Recipe,
    generators: dict[str, torch.Generator], device,
) -> torch.Tensor:
    """The MaskGIT loss of one micro-batch (masks and condition dropout drawn from `generators`)."""
    tokens = batch["tokens"].to(device) if "tokens" in batch else encode_images(comps.vqvae, batch["pixels"])
    drop = draw_dropout(tokens.shape[0], recipe.train.cond_dropout, generators["dropout"])
    cond = batch_conditioning(batch, comps, empty, drop, recipe.adapter.text_encoder, device)
    input_ids, mask = mask_tokens(tokens, comps.mask_id, generators["mask"], recipe.train.min_masking_rate)
    logits = transformer(
        input_ids,
        encoder_hidden_states=cond.hidden,
        pooled_text_emb=cond.pooled,
        micro_conds=batch["micro_conds"].to(device),
    )
    return masked_cross_entropy(logits, tokens, mask, recipe.train.label_smoothing)


@dataclass
class StepResult:
    """What one optimizer step did: its mean loss over every process, the gradient norm (before clipping), whether
    both were finite (a non-finite step updates nothing) and its duration in seconds."""

    loss: float
    grad_norm: float
    finite: bool
    seconds: float


def train_step(run, batches, step: int) -> StepResult:
    """Optimizer step number `step` of `run` (a loop.Run): accumulate, clip, update unless non-finite, schedule.

    Raises TrainingStopped on a non-finite loss or gradient unless `train.skip_nonfinite`.
    """
    t, accelerator = run.recipe.train, run.accelerator
    started = time.perf_counter()
    total = torch.zeros((), device=run.device)
    for micro in range(t.grad_accum):
        batch = next(batches)
        sync = micro == t.grad_accum - 1  # gradients are all-reduced on the last micro-batch only
        with (contextlib.nullcontext() if sync else accelerator.no_sync(run.transformer)), accelerator.autocast():
            loss = compute_loss(batch, run.transformer, run.comps, run.empty, run.recipe, run.generators, run.device)
        accelerator.backward(loss / t.grad_accum)
        total += loss.detach() / t.grad_accum
    grad_norm = float(clip_gradients(run))
    loss_value = accelerator.gather(total[None]).mean().item()
    # fp16 loss scaling overflows now and then: the scaler skips those steps itself and lowers its scale
    finite = math.isfinite(loss_value) and (math.isfinite(grad_norm) or accelerator.scaler is not None)
    if not finite and not t.skip_nonfinite:
        raise TrainingStopped(nonfinite_message(run.out, step, loss_value, grad_norm), 1, error=True)
    if finite:  # else (train.skip_nonfinite) the step counts for the data and the schedule but changes no weight
        run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm, finite, time.perf_counter() - started)


def clip_gradients(run) -> torch.Tensor:
    """Clip to optim.max_grad_norm (0: no clipping); returns the norm before clipping."""
    if run.accelerator.sync_gradients and run.recipe.optim.max_grad_norm > 0:
        return run.accelerator.clip_grad_norm_(run.trainable, run.recipe.optim.max_grad_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.trainable if p.grad is not None]))


def peak_memory_gb() -> float:
    """The peak so far in GB of 10^9 bytes (the unit of the memory estimate): GPU memory allocated, else process RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 10**9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 10**9  # Linux reports KiB
