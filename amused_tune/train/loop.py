"""The training loop: `train(recipe)` fine-tunes aMUSEd's U-ViT with the MaskGIT objective.

Top to bottom: set up the output folder and accelerate; load the base; attach LoRA (or unfreeze everything);
build data, optimizer and schedule; resume; then for each optimizer step accumulate `grad_accum` micro-batches
(mask tokens, drop conditioning, cross-entropy on masked tokens), clip, step, log, sample and checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
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

from amused_tune import adapters
from amused_tune.common import place, torch_dtype
from amused_tune.data.datasets import collate, prepare_training_data
from amused_tune.masking import mask_tokens, masked_cross_entropy
from amused_tune.models import Components, encode_images, encode_prompts, load_components, text_conditioning
from amused_tune.recipe import Recipe, RecipeError
from amused_tune.train import checkpoints, outputs, report
from amused_tune.train.validation import Validator

log = logging.getLogger(__name__)

class TrainingStopped(Exception):
    """The run stopped early: a signal (after saving a checkpoint) or a non-finite loss (`error`: nothing saved, the
    last checkpoint intact). `exit_code` is what the CLI returns: 128 + the signal, or 1."""

    def __init__(self, message: str, exit_code: int, error: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.error = error


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


def setup_models(recipe: Recipe, comps: Components, device: torch.device) -> list[torch.nn.Parameter]:
    """Freeze what is frozen, attach adapters, place weights; returns the trainable parameters."""
    frozen_dtype = torch_dtype(recipe.model.dtype)
    place(comps.vqvae.requires_grad_(False).eval(), device, frozen_dtype)
    place(comps.text_encoder.requires_grad_(False).eval(), device, frozen_dtype)
    transformer = comps.transformer
    if recipe.adapter.kind == "lora":
        if recipe.model.quantize:  # before LoRA, so that peft wraps the 8/4-bit layers (CUDA only)
            from amused_tune.quantize import quantize_linear_layers

            quantize_linear_layers(transformer, recipe.model.quantize, frozen_dtype, device)
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
        """(index, seed) pairs: the seed, a function of this process's position in the stream, draws the item's
        crop, flip or cache variant (see data.preprocess.item_draws), whichever worker fetches it."""
        per_epoch = len(self.epoch_order(0))
        epoch, skip = divmod(self.start, per_epoch)
        position = self.start
        while True:
            for index in self.epoch_order(epoch)[skip:]:
                yield index, (self.seed * 1_000_003 + self.rank) * 1_000_000_007 + position
                position += 1
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
    input_ids, mask = mask_tokens(tokens, comps.mask_id, generators["mask"], recipe.train.min_masking_rate)
    logits = transformer(
        input_ids,
        encoder_hidden_states=cond.hidden,
        pooled_text_emb=cond.pooled,
        micro_conds=batch["micro_conds"].to(device),
    )
    return masked_cross_entropy(logits, tokens, mask, recipe.train.label_smoothing)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


# --------------------------------------------------------------------------------------------- the run


def train(recipe: Recipe, components: Components | None = None) -> dict:
    """Run one recipe to `train.max_steps`; returns a summary (final step, loss, output paths).

    Raises TrainingStopped after SIGINT/SIGTERM (once a checkpoint is written) or a non-finite loss (nothing written).
    """
    stop = _StopFlag()
    try:
        return _run(recipe, components, stop)
    except BaseException:
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress line, so the error gets its own
            bar.close()
        raise
    finally:
        stop.restore()


def _run(recipe: Recipe, components: Components | None, stop: "_StopFlag") -> dict:
    recipe.validate()
    out = Path(recipe.output.dir)
    accelerator = make_accelerator(recipe)
    check_distributed(accelerator)
    main = accelerator.is_main_process
    outputs.prepare_output_dir(out, recipe, main)
    accelerator.wait_for_everyone()  # the main process may have discarded an old run (output.overwrite)
    set_seed(recipe.train.seed)  # the init of the LoRA weights, identical on every process

    if components is None:
        report.loading(recipe)
    comps = components or load_components(recipe.model.base)
    check_resolution(recipe, comps)
    device = accelerator.device
    trainable = setup_models(recipe, comps, device)
    names = {id(p): n for n, p in list(comps.transformer.named_parameters()) + [
        (f"text_encoder.{n}", p) for n, p in comps.text_encoder.named_parameters()]}
    dataset, empty_embeds = prepare_training_data(recipe, comps, accelerator)  # validates; may cache and offload
    report.banner(recipe, out, accelerator.num_processes)
    empty = Conditioning(*(e.to(device) for e in empty_embeds))
    validator = Validator(recipe, comps, (empty.hidden, empty.pooled))
    if validator.defaults_message:
        accelerator.print(validator.defaults_message)

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
    rngs = {**generators, **checkpoints.dataset_rngs(dataset)}  # what checkpoints save, per process
    resumed = None if t.resume == "none" else checkpoints.resume(
        out, recipe, trainable, names, optimizer, lr_scheduler, accelerator)
    step, skipped = (resumed.step, resumed.skipped) if resumed else (0, 0)
    if step >= t.max_steps:
        accelerator.print(f"{out} already reached train.max_steps={t.max_steps} (checkpoint at step {step}): nothing "
                          "to do; pass a larger --train.max_steps to train further")
        summary = {"step": step, "output_dir": str(out), "already_done": True}
        if main and not outputs.final_written(out, recipe):  # the run was stopped between its last save and here
            summary.update(outputs.write_final(out, recipe, accelerator.unwrap_model(transformer), comps))
        return summary

    loader = DataLoader(
        dataset, batch_size=t.batch_size, collate_fn=collate, num_workers=recipe.data.num_workers,
        sampler=EpochSampler(len(dataset), t.seed, accelerator.process_index, accelerator.num_processes,
                             start=step * samples_per_step),
    )
    batches = iter(loader)
    checkpoints.restore_rng(resumed, rngs, accelerator, recipe)  # after iter(): creating it draws from torch's RNG
    metrics_file = outputs.MetricsFile(out / "metrics.jsonl", resumed_step=step, enabled=main)
    stop.install()
    if main and step == 0 and validator.enabled:
        validator(accelerator.unwrap_model(transformer), 0, out, accelerator)
    progress = tqdm(total=t.max_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    images_per_step = samples_per_step * accelerator.num_processes
    loss_value = float("nan")

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
        # fp16 loss scaling overflows now and then: the scaler skips those steps itself and lowers its scale
        finite = math.isfinite(loss_value) and (math.isfinite(grad_value) or accelerator.scaler is not None)
        if not finite and not t.skip_nonfinite:
            raise TrainingStopped(nonfinite_message(out, step + 1, loss_value, grad_value), 1, error=True)
        if finite:
            optimizer.step()
        else:  # train.skip_nonfinite: the step counts (data, schedule) but changes no weight
            skipped += 1
            log.warning("step %d: non-finite loss (%s) or gradient norm (%s): skipped (%d so far)",
                        step + 1, loss_value, grad_value, skipped)
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
        stopping = stop.agreed(accelerator)  # every process stops after the same step
        if step % t.checkpoint_every == 0 or step == t.max_steps or stopping:
            checkpoints.save(out, recipe, step, trainable, names, optimizer, lr_scheduler, accelerator, rngs,
                             skipped)
        if stopping:
            progress.close()
            raise TrainingStopped(
                f"stopped by {signal.Signals(stopping).name} after step {step}; checkpoint written to "
                f"{out / 'checkpoints' / f'step-{step}'}. Resume with: amused-tune {out / 'recipe.yaml'} "
                "--train.resume=auto", 128 + stopping)

    progress.close()
    stop.restore()
    accelerator.wait_for_everyone()
    summary = {"step": step, "loss": loss_value, "output_dir": str(out), "skipped_nonfinite": skipped}
    if main:
        summary.update(outputs.write_final(out, recipe, accelerator.unwrap_model(transformer), comps))
    accelerator.end_training()
    return summary


class _StopFlag:
    """SIGINT/SIGTERM during the loop: the first signal lets the loop finish its optimizer step, write a checkpoint
    and raise TrainingStopped (exit code 128 + signal: 130, 143). A second one is only acknowledged (the checkpoint
    being written completes); a third aborts at once with KeyboardInterrupt: the partial checkpoint folder is
    removed and the previous checkpoint is untouched either way. Signals within a second of the previous one count
    once (`accelerate launch` forwards the Ctrl-C that the processes already got from the terminal)."""

    def __init__(self):
        self.signum = 0
        self.count = 0
        self._last = 0.0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.count and now - self._last < 1.0:  # a launcher forwarding the same Ctrl-C: not a new one
            return
        self._last = now
        self.count += 1
        say = os.environ.get("RANK", "0") == "0"  # launched processes all get the signal: one of them says so
        if self.count == 1:
            self.signum = signum
            if say:
                print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                      "(interrupt twice more to abort without it)", file=sys.stderr, flush=True)
        elif self.count == 2:
            if say:
                print("already stopping: the checkpoint is being written (the previous one stays intact); "
                      "interrupt once more to abort", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt

    def agreed(self, accelerator) -> int:
        """The signal that stops the run, the same on every process (0: none)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass
        self._previous.clear()


def check_distributed(accelerator) -> None:
    """Refuse the sharded launch modes: the loop (clipping, accumulation, checkpoints of the unsharded trainable
    weights) is written for data parallelism; under FSDP or DeepSpeed it would save stale weights."""
    kind = accelerator.distributed_type.name
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise RecipeError(f"accelerate launch with {kind} is not supported: launch with --multi_gpu (data parallel, "
                          "DDP) instead; docs/distributed.md explains why and how")


def nonfinite_message(out: Path, step: int, loss: float, grad_norm: float) -> str:
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
    found = checkpoints.list_checkpoints(out / "checkpoints")
    kept = f"the last good checkpoint, {found[-1]}, is intact" if found else "no checkpoint had been written yet"
    return (f"non-finite {what} at step {step}: the run stopped and {kept}. Rerun the same command with "
            "--train.skip_nonfinite=true to skip such steps, or lower optim.lr (a new recipe: use a new output.dir)")
