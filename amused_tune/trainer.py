"""The training loop: `train(recipe)` fine-tunes aMUSEd's U-ViT with the MaskGIT objective.

Top to bottom: set up the output folder and accelerate; load the base; attach LoRA (or unfreeze everything);
build data, optimizer and schedule; resume; then for each optimizer step accumulate `grad_accum` micro-batches
(mask tokens, drop conditioning, cross-entropy on masked tokens), clip, step, log, sample and checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from amused_tune import adapters, checkpoints, outputs
from amused_tune.data import build_dataset, collate
from amused_tune.masking import mask_tokens, masked_cross_entropy
from amused_tune.models import Components, encode_images, encode_prompts, load_components, text_conditioning
from amused_tune.recipe import Recipe, RecipeError
from amused_tune.validation import Validator

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(Exception):
    """The run stopped early (signal or non-finite loss) after saving; `exit_code` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Conditioning:
    """Text conditioning of a batch: CLIP penultimate hidden states and pooled projection."""

    hidden: torch.Tensor
    pooled: torch.Tensor


# --------------------------------------------------------------------------------------------- setup


def make_accelerator(recipe: Recipe) -> Accelerator:
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    cpu = recipe.train.device == "cpu" or (recipe.train.device is None and not torch.cuda.is_available())
    if cpu and precision == "fp16":
        log.warning("train.precision=fp16 needs a GPU: using bf16 on the CPU")
        precision = "bf16"
    log_with = "tensorboard" if recipe.output.tensorboard else None
    return Accelerator(
        mixed_precision=precision, cpu=cpu, log_with=log_with, project_dir=str(Path(recipe.output.dir) / "logs")
    )


def enable_grad_checkpointing(transformer: torch.nn.Module) -> None:
    """Recompute each transformer layer and U-ViT block in the backward pass.

    diffusers' own switch for UVit2DModel crashes (it hands keyword arguments to a reentrant checkpoint), so the
    kit wraps the blocks' forward with non-reentrant checkpointing; parameter names are unchanged.
    """
    blocks = list(transformer.transformer_layers) + [transformer.down_block, transformer.up_block]
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        block.forward = forward


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module; cast only when its dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def setup_models(recipe: Recipe, comps: Components, device: torch.device) -> list[torch.nn.Parameter]:
    """Freeze what is frozen, attach adapters, place weights; returns the trainable parameters."""
    frozen_dtype = DTYPES[recipe.model.dtype]
    place(comps.vqvae.requires_grad_(False).eval(), device, frozen_dtype)
    place(comps.text_encoder.requires_grad_(False).eval(), device, frozen_dtype)
    transformer = comps.transformer
    if recipe.adapter.kind == "lora":
        place(transformer, device, frozen_dtype)
        adapters.attach_lora(
            transformer, recipe.adapter.rank, recipe.adapter.alpha, recipe.adapter.targets, recipe.adapter.dropout
        )
        if recipe.adapter.text_encoder:
            adapters.attach_lora(
                comps.text_encoder, recipe.adapter.rank, recipe.adapter.alpha, recipe.adapter.text_encoder_targets
            )
    else:
        place(transformer, device, torch.float32).requires_grad_(True)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    trainable += [p for p in comps.text_encoder.parameters() if p.requires_grad]
    for p in trainable:  # LoRA weights train in fp32 whatever the frozen base is held in
        p.data = p.data.float()
    if recipe.train.grad_checkpointing:
        enable_grad_checkpointing(transformer)
    transformer.train()
    return trainable


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = recipe.optim
    if o.adam_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class EpochSampler(Sampler):
    """Endless data order: a fresh permutation per epoch (seeded by seed and epoch), sharded across processes.

    `start` skips the first `start` indices of this process's stream, so a resumed run sees exactly the samples
    an uninterrupted run would have.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def epoch_order(self, epoch: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        repeats = math.ceil(self.world / self.size)  # fewer samples than processes: every process still gets one
        return order.repeat(repeats)[self.rank :: self.world].tolist()

    def __iter__(self):
        per_epoch = len(self.epoch_order(0))
        epoch, skip = divmod(self.start, per_epoch)
        while True:
            yield from self.epoch_order(epoch)[skip:]
            epoch, skip = epoch + 1, 0


def check_resolution(recipe: Recipe, comps: Components) -> int:
    native = comps.resolution
    wanted = recipe.model.resolution or native
    if wanted != native:
        raise RecipeError(
            f"model.resolution={wanted} but {recipe.model.base} generates {native}x{native} images: "
            f"set model.resolution={native} or pick the matching base model"
        )
    return native


# --------------------------------------------------------------------------------------------- one step


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
    input_ids, mask = mask_tokens(tokens, comps.mask_id, generators["mask"])
    logits = transformer(
        input_ids,
        encoder_hidden_states=cond.hidden,
        pooled_text_emb=cond.pooled,
        micro_conds=batch["micro_conds"].to(device),
    )
    return masked_cross_entropy(logits, tokens, mask)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


# --------------------------------------------------------------------------------------------- the run


def train(recipe: Recipe, components: Components | None = None) -> dict:
    """Run one recipe to `train.max_steps`; returns a summary (final step, loss, output paths)."""
    recipe.validate()
    out = Path(recipe.output.dir)
    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    outputs.prepare_output_dir(out, recipe, main)
    set_seed(recipe.train.seed)  # the init of the LoRA weights, identical on every process

    comps = components or load_components(recipe.model.base)
    resolution = check_resolution(recipe, comps)
    device = accelerator.device
    trainable = setup_models(recipe, comps, device)
    names = {id(p): n for n, p in list(comps.transformer.named_parameters()) + [
        (f"text_encoder.{n}", p) for n, p in comps.text_encoder.named_parameters()]}
    dataset = build_dataset(recipe.data, resolution)
    empty = Conditioning(*(e.to(device) for e in encode_prompts(comps.text_encoder, comps.tokenizer, [""])))
    validator = Validator(recipe, comps, (empty.hidden, empty.pooled))

    optimizer = make_optimizer(recipe, trainable)
    lr_scheduler = get_scheduler(
        recipe.optim.scheduler, optimizer, num_warmup_steps=recipe.optim.warmup_steps,
        num_training_steps=recipe.train.max_steps,
    )
    transformer, optimizer = accelerator.prepare(comps.transformer, optimizer)
    if recipe.adapter.text_encoder:
        comps.text_encoder = accelerator.prepare(comps.text_encoder)

    t = recipe.train
    samples_per_step = t.batch_size * t.grad_accum
    seed = t.seed * 1_000_003 + accelerator.process_index
    generators = {"mask": torch.Generator().manual_seed(seed), "dropout": torch.Generator().manual_seed(seed + 1)}
    step = 0
    if t.resume != "none":
        step = resume(out, recipe, t.resume, trainable, names, optimizer, lr_scheduler, accelerator, generators)
    if step >= t.max_steps:
        accelerator.print(f"{out} already reached train.max_steps={t.max_steps}: nothing to do")
        return {"step": step, "output_dir": str(out), "already_done": True}

    loader = DataLoader(
        dataset, batch_size=t.batch_size, collate_fn=collate, num_workers=recipe.data.num_workers,
        sampler=EpochSampler(len(dataset), t.seed, accelerator.process_index, accelerator.num_processes,
                             start=step * samples_per_step),
    )
    batches = iter(loader)
    metrics_file = outputs.MetricsFile(out / "metrics.jsonl", resumed_step=step, enabled=main)
    stop = _StopFlag()
    if main and step == 0 and validator.enabled:
        validator(accelerator.unwrap_model(transformer), 0, out, accelerator)
    progress = tqdm(total=t.max_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    images_per_step = samples_per_step * accelerator.num_processes
    loss_value = float("nan")
    skipped = 0

    while step < t.max_steps:
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            batch = next(batches)
            sync = micro == t.grad_accum - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(transformer)), accelerator.autocast():
                loss = compute_loss(batch, transformer, comps, empty, recipe, generators, device)
            accelerator.backward(loss / t.grad_accum)
            total += loss.detach() / t.grad_accum
        if accelerator.sync_gradients and recipe.optim.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(trainable, recipe.optim.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in trainable if p.grad is not None]))
        loss_value = accelerator.gather(total[None]).mean().item()
        grad_value = float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            optimizer.zero_grad(set_to_none=True)
            if not t.skip_nonfinite:
                raise TrainingStopped(
                    f"non-finite loss ({loss_value}) or gradient norm ({grad_value}) at step {step + 1}: lower "
                    f"optim.lr or use train.precision=bf16; the last checkpoint in {out / 'checkpoints'} is intact "
                    "(or set train.skip_nonfinite=true)", 1)
            skipped += 1
            step += 1
            lr_scheduler.step()
            metrics_file.write({"step": step, "loss": loss_value, "skipped_nonfinite": skipped})
            continue
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - started
        row = {"step": step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_value,
               "images_per_s": images_per_step / elapsed, "step_s": elapsed, "peak_mem_gb": peak_memory_gb(),
               "skipped_nonfinite": skipped}
        if step % t.log_every == 0 or step == t.max_steps:
            metrics_file.write(row)
            if recipe.output.tensorboard:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{row['images_per_s']:.1f}", lr=f"{row['lr']:.2e}")

        if main and validator.due(step):
            validator(accelerator.unwrap_model(transformer), step, out, accelerator)
        if step % t.checkpoint_every == 0 or step == t.max_steps or stop.signum:
            save(out, recipe, step, trainable, names, optimizer, lr_scheduler, accelerator, generators)
        if stop.signum:
            progress.close()
            code = 128 + stop.signum
            accelerator.print(f"stopped by signal {stop.signum} after step {step}; resume with:\n  "
                              f"amused-tune {out / 'recipe.yaml'}")
            raise TrainingStopped(f"interrupted at step {step}", code)

    progress.close()
    stop.restore()
    accelerator.wait_for_everyone()
    summary = {"step": step, "loss": loss_value, "output_dir": str(out), "skipped_nonfinite": skipped}
    if main:
        summary.update(outputs.write_final(out, recipe, accelerator.unwrap_model(transformer), comps))
    accelerator.end_training()
    return summary


class _StopFlag:
    """Remember SIGINT/SIGTERM so that the loop finishes its optimizer step and checkpoints before exiting."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum:  # a second signal while saving: keep saving; the previous checkpoint stays intact
            print("already stopping: the checkpoint is being written", file=sys.stderr)
            return
        self.signum = signum
        print(f"\nsignal {signum}: finishing this step and writing a checkpoint", file=sys.stderr)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------- checkpoints


def save(out, recipe, step, trainable, names, optimizer, lr_scheduler, accelerator, generators) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    state = {"optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
             "rng": checkpoints.rng_state(generators)}
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    weights = {names[id(p)]: p for p in trainable}
    meta = {"recipe_fingerprint": outputs.recipe_fingerprint(recipe), "samples_per_process": step * recipe.train.batch_size * recipe.train.grad_accum}
    checkpoints.save_checkpoint(out / "checkpoints", step, weights, state, meta, recipe.train.keep_checkpoints)


def resume(out, recipe, where, trainable, names, optimizer, lr_scheduler, accelerator, generators) -> int:
    """Restore the newest complete checkpoint (or the one at `where`); returns its step, 0 if none."""
    if where == "auto":
        found = checkpoints.load_latest(out / "checkpoints")
        if found is None:
            return 0
        path, weights, state, meta = found
    else:
        path = Path(where)
        weights, state, meta = checkpoints.load_checkpoint(path)
    by_name = {names[id(p)]: p for p in trainable}
    if set(weights) != set(by_name):
        raise RecipeError(f"checkpoint {path} holds other trainable weights than this recipe trains: "
                          "pass train.resume=none or another output.dir")
    with torch.no_grad():
        for name, p in by_name.items():
            p.copy_(weights[name].to(p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    checkpoints.set_rng_state(state["rng"], generators)
    accelerator.print(f"resumed from {path} (step {meta['step']})")
    return int(meta["step"])
