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

from amused_tune.model.masking import mask_tokens, masked_cross_entropy
from amused_tune.model.bases import Components, encode_images, encode_prompts, text_conditioning
from amused_tune.recipe import Recipe
from amused_tune.train.stops import TrainingStopped, nonfinite_message


@dataclass
class Conditioning:
    """Text conditioning of a batch: CLIP penultimate hidden states and pooled projection."""

    hidden: torch.Tensor
    pooled: torch.Tensor


def draw_dropout(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which of n samples lose their text (probability p each): one draw per sample in batch order, the same draws
    whatever the batch size (n draws of one value each are one draw of n values)."""
    return torch.rand(n, generator=generator) < p


def batch_conditioning(
    batch: dict, comps: Components, empty: Conditioning, drop: torch.Tensor, train_text: bool, device,
    text_encoder: torch.nn.Module | None = None, empty_for_dropout: bool = True,
) -> Conditioning:
    """Text conditioning of a batch, with dropped samples given the empty prompt's hidden states and pooled.
    `text_encoder`: the encoder as the step calls it (DDP-wrapped when it trains); default the raw one."""
    if train_text:  # the text encoder learns: encode with gradients, dropped samples as the empty prompt
        prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
        ids = comps.tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
        encoder = text_encoder if text_encoder is not None else comps.text_encoder
        return Conditioning(*text_conditioning(encoder, comps.tokenizer, ids.to(device, non_blocking=True)))
    if "hidden" in batch:
        hidden, pooled = batch["hidden"].to(device, non_blocking=True), batch["pooled"].to(device, non_blocking=True)
    else:  # as the text cache encodes: the frozen encoder in its own dtype, outside the autocast
        with torch.autocast(torch.device(device).type, enabled=False):
            hidden, pooled = encode_prompts(comps.text_encoder, comps.tokenizer, batch["prompt"])
    if not empty_for_dropout:  # train.cond_dropout = 0: nothing to replace (the draws were still made)
        return Conditioning(hidden, pooled)
    d = drop.to(device)
    hidden = torch.where(d[:, None, None], empty.hidden.to(hidden.dtype), hidden)
    pooled = torch.where(d[:, None], empty.pooled.to(pooled.dtype), pooled)
    return Conditioning(hidden, pooled)


def batch_tokens(batch: dict, comps: Components, device) -> torch.Tensor:
    """The batch's VQ tokens: cached, or encoded now in fp32 outside any autocast, as the cache encodes them (the
    nearest codes then depend neither on the training precision nor on the batch)."""
    if "tokens" in batch:
        return batch["tokens"].to(device, non_blocking=True)
    with torch.autocast(torch.device(device).type, enabled=False):
        return encode_images(comps.vqvae, batch["pixels"].to(device, non_blocking=True).float())


def compute_loss(
    batch: dict, transformer, comps: Components, empty: Conditioning, recipe: Recipe,
    generators: dict[str, torch.Generator], device, text_encoder: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The MaskGIT loss of one micro-batch (masks and condition dropout drawn from `generators`)."""
    tokens = batch_tokens(batch, comps, device)
    drop = draw_dropout(tokens.shape[0], recipe.train.cond_dropout, generators["dropout"])
    cond = batch_conditioning(batch, comps, empty, drop, recipe.adapter.text_encoder, device, text_encoder,
                              empty_for_dropout=recipe.train.cond_dropout > 0)
    input_ids, mask = mask_tokens(tokens, comps.mask_id, generators["mask"], recipe.train.min_masking_rate,
                                 recipe.train.max_masking_rate)
    logits = transformer(
        input_ids,
        encoder_hidden_states=cond.hidden,
        pooled_text_emb=cond.pooled,
        micro_conds=batch["micro_conds"].to(device, non_blocking=True),
    )
    loss = masked_cross_entropy(logits, tokens, mask, recipe.train.label_smoothing)
    if "prior" in batch:  # prior preservation (data/prior.py): the base's own images, weighted by prior.weight
        loss = loss + recipe.prior.weight * compute_loss(batch["prior"], transformer, comps, empty, recipe,
                                                         generators, device, text_encoder)
    return loss


@dataclass
class StepResult:
    """What one optimizer step did: its mean loss over every process, the gradient norm (before clipping), whether
    both were finite (a non-finite step updates nothing) and its duration in seconds. Under fp16 loss scaling:
    the scale after the step, and whether the scaler skipped the update (its gradients overflowed)."""

    loss: float
    grad_norm: float
    finite: bool
    seconds: float
    loss_scale: float | None = None
    scaler_skipped: bool = False


def train_step(run, batches, step: int) -> StepResult:
    """Optimizer step number `step` of `run` (a loop.Run): accumulate, clip, update unless non-finite, schedule.

    Raises TrainingStopped on a non-finite loss or gradient unless `train.skip_nonfinite`.
    """
    t, accelerator = run.recipe.train, run.accelerator
    started = time.perf_counter()
    total = torch.zeros((), device=run.device)  # summed on the device: no host sync per micro-batch
    for micro in range(t.grad_accum):
        batch = next(batches)
        sync = micro == t.grad_accum - 1  # gradients are all-reduced on the last micro-batch only
        with contextlib.ExitStack() as stack:
            if not sync:
                for module in run.wrapped:
                    stack.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                loss = compute_loss(batch, run.transformer, run.comps, run.empty, run.recipe, run.generators,
                                    run.device, run.text_encoder)
            accelerator.backward(loss / t.grad_accum)
        total += loss.detach() / t.grad_accum
    norm = clip_gradients(run)
    scaler = accelerator.scaler
    # the step's one host sync: its loss, gradient norm (and loss scale) read back together
    read = [accelerator.gather(total[None]).mean(), torch.as_tensor(norm).to(total.device, torch.float32)]
    if scaler is not None and scaler._scale is not None:
        read.append(scaler._scale.to(total.device, torch.float32).reshape(()))
    values = torch.stack(read).tolist()
    loss_value, grad_norm = values[0], values[1]
    # fp16 loss scaling: the scaler skips a step whose gradients overflowed (inf or NaN) and lowers its scale;
    # only a non-finite loss is the run's problem then
    finite = math.isfinite(loss_value) and (math.isfinite(grad_norm) or scaler is not None)
    if not finite and not t.skip_nonfinite:
        raise TrainingStopped(nonfinite_message(run.out, step, loss_value, grad_norm), 1, error=True)
    scale = (values[2] if len(values) > 2 else float(scaler.get_scale())) if scaler is not None else None
    if finite or scaler is not None:  # the scaler must see every step it unscaled, to skip it and update itself
        run.optimizer.step()  # else (train.skip_nonfinite) the step counts for the data and schedule, no weight
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    if scaler is None:
        return StepResult(loss_value, grad_norm, finite, seconds)
    # the scaler lowers its scale exactly when it skipped the update (inf or NaN gradients)
    return StepResult(loss_value, grad_norm, finite, seconds, float(scaler.get_scale()), scaler.get_scale() < scale)


def clip_gradients(run) -> torch.Tensor:
    """Clip to optim.max_grad_norm (0: no clipping); returns the norm before clipping."""
    if run.accelerator.sync_gradients and run.recipe.optim.max_grad_norm > 0:
        return run.accelerator.clip_grad_norm_(run.trainable, run.recipe.optim.max_grad_norm)
    grads = [p.grad for p in run.trainable if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def peak_memory_gb() -> float:
    """The peak so far in GB of 10^9 bytes (the unit of the memory estimate): GPU memory allocated, else process RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 10**9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 10**9  # Linux reports KiB
