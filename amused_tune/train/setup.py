"""Building blocks of a training run, used by `loop.set_up`: accelerate, the models (frozen parts, LoRA or full
fine-tuning, gradient checkpointing), the optimizer, the endless sharded data order and the checks made before
training starts."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_wandb_available
from diffusers.optimization import get_scheduler
from torch.utils.data import Sampler

from amused_tune import optimizers
from amused_tune.model import adapters, lean
from amused_tune.common import place, torch_dtype
from amused_tune.model.bases import Components
from amused_tune.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


TRACKER_INSTALLED = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}  # as accelerate checks


def trackers(recipe: Recipe) -> list[str]:
    """The experiment trackers a run logs to: `output.log_with`, plus tensorboard when `output.tensorboard`."""
    chosen = list(recipe.output.log_with) + (["tensorboard"] if recipe.output.tensorboard else [])
    return list(dict.fromkeys(chosen))


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker whose package is missing, in one line naming the extra that installs it."""
    for name in names:
        if not TRACKER_INSTALLED[name]():
            raise RecipeError(f"output.log_with={name} needs the {name} package: pip install \"amused-tune[{name}]\" "
                              f"(or drop {name} from output.log_with)")


def autocast_precision(recipe: Recipe, cpu: bool) -> str:
    """accelerate's mixed_precision for `train.precision` (fp16 falls back to bf16 on the CPU); refuses a half base
    under the other half autocast (fp16 weights under bf16 autocast, or the reverse), which casts every matmul."""
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    if cpu and precision == "fp16":
        log.warning("train.precision=fp16 needs a GPU: using bf16 on the CPU")
        precision = "bf16"
    halves = {recipe.model.dtype, {"no": "fp32"}.get(precision, precision)} - {"fp32"}
    if len(halves) > 1:
        raise RecipeError(f"model.dtype={recipe.model.dtype} with train.precision={precision} mixes two half precisions "
                          f"(on the CPU fp16 autocast becomes bf16): set model.dtype and train.precision to the same one")
    return precision


def make_accelerator(recipe: Recipe) -> Accelerator:
    cpu = recipe.train.device == "cpu" or (recipe.train.device is None and not torch.cuda.is_available())
    precision = autocast_precision(recipe, cpu)
    log_with = trackers(recipe)
    check_trackers(log_with)
    return Accelerator(
        mixed_precision=precision, cpu=cpu, log_with=log_with or None,
        project_dir=str(Path(recipe.output.dir) / "logs"),
    )


def check_distributed(accelerator) -> None:
    """Refuse the sharded launch modes: the loop (clipping, accumulation, checkpoints of the unsharded trainable
    weights) is written for data parallelism; under FSDP or DeepSpeed it would save stale weights."""
    kind = accelerator.distributed_type.name
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise RecipeError(f"accelerate launch with {kind} is not supported: launch with --multi_gpu (data parallel, "
                          "DDP) instead; docs/distributed.md explains why and how")


def check_resolution(recipe: Recipe, comps: Components) -> int:
    native = comps.resolution
    wanted = recipe.model.resolution or native
    if wanted != native:
        raise RecipeError(
            f"model.resolution={wanted} but {recipe.model.base} generates {native}x{native} images: "
            f"set model.resolution={native} or pick the matching base model"
        )
    return native


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


def place_encoders(recipe: Recipe, comps: Components, device: torch.device) -> None:
    """The VQ model and the text encoder, frozen, on `device`: placed before the U-ViT, so that building the cache
    encodes with them alone on the GPU (the cache then moves them to the CPU). The text encoder is held in
    `model.dtype`; the VQ model in fp32 whatever it is, so that an image's nearest codes do not depend on the
    precision or the batch it is encoded in (the cache and the uncached path give the same tokens)."""
    place(comps.vqvae.requires_grad_(False).eval(), device, torch.float32)
    place(comps.text_encoder.requires_grad_(False).eval(), device, torch_dtype(recipe.model.dtype))


def setup_models(recipe: Recipe, comps: Components, device: torch.device) -> list[torch.nn.Parameter]:
    """Attach adapters to the U-ViT (and the text encoder), place it; returns the trainable parameters. The VQ
    model and text encoder are placed before, by `place_encoders`."""
    frozen_dtype = torch_dtype(recipe.model.dtype)
    transformer = comps.transformer
    if recipe.adapter.kind != "full":  # lora, dora, lokr or loha
        if recipe.model.quantize:  # before LoRA, so that peft wraps the 8/4-bit layers (CUDA only)
            from amused_tune.model.quantize import quantize_linear_layers

            quantize_linear_layers(transformer, recipe.model.quantize, frozen_dtype, device)
        place(transformer, device, frozen_dtype)
        adapters.attach_lora(
            transformer, recipe.adapter.rank, recipe.adapter.alpha, recipe.adapter.targets, recipe.adapter.dropout,
            kind=recipe.adapter.kind,
        )
        if recipe.adapter.text_encoder:  # lora or dora (the recipe refuses the LyCORIS kinds on the text encoder)
            adapters.attach_lora(
                comps.text_encoder, recipe.adapter.rank, recipe.adapter.alpha, recipe.adapter.text_encoder_targets,
                kind=recipe.adapter.kind,
            )
    else:
        place(transformer, device, torch.float32).requires_grad_(True)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    trainable += [p for p in comps.text_encoder.parameters() if p.requires_grad]
    for p in trainable:  # LoRA weights train in fp32 whatever the frozen base is held in
        p.data = p.data.float()
    if recipe.train.grad_checkpointing:
        enable_grad_checkpointing(transformer)
    lean.make_lean(transformer)  # the same maths in fewer operators (model/lean.py)
    if recipe.adapter.text_encoder:
        lean.make_lean(comps.text_encoder)
    transformer.train()
    return trainable


def param_groups(models, weight_decay: float) -> list[dict]:
    """The trainable parameters of `models` (a module or several) as AdamW groups: weight decay on weight matrices
    and kernels only; norms, biases and embeddings (1-d tensors, or any weight of an embedding or norm layer) are
    not decayed, as in the reference trainer. Empty groups are left out."""
    decay, keep = [], []
    for model in models if isinstance(models, (list, tuple)) else [models]:
        for module in model.modules():
            exempt = isinstance(module, torch.nn.Embedding) or "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    (keep if exempt or p.ndim < 2 or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(recipe: Recipe, params: list) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names (amused_tune.optimizers; `optim.adam_8bit` means adamw8bit) over `params`:
    parameters (all decayed by `optim.weight_decay`), or groups already split for weight decay (`param_groups`)."""
    o = recipe.optim
    groups = list(params) if params and isinstance(params[0], dict) else [{"params": list(params)}]
    groups = [{"weight_decay": o.weight_decay, **g} for g in groups]
    entry = optimizers.REGISTRY[o.resolved_name]
    try:
        return entry.build(groups, o.lr, optimizers.hyperparameters(o))
    except ImportError as err:
        if not entry.package:
            raise
        raise RecipeError(f"optim.name={entry.name} needs the {entry.package.split()[0]} package: pip install "
                          f"{entry.package}") from err


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    """The learning-rate schedule: linear warmup over `optim.warmup_steps`, then `optim.scheduler` (diffusers'
    "constant" ignores a warmup: a constant schedule with one is its "constant_with_warmup")."""
    o = recipe.optim
    name = "constant_with_warmup" if o.scheduler == "constant" and o.warmup_steps else o.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=recipe.train.max_steps)


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
