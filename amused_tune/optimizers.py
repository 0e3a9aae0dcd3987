"""The optimizers a recipe can name (`optim.name`), built from the recipe, and the bytes of state each one keeps.

  adamw       torch's AdamW (fused kernel when every trainable weight is on one GPU or the CPU): two fp32 moments
  adamw8bit   bitsandbytes' 8-bit AdamW: two 8-bit moments + an fp32 scale per 256-element block
  lion8bit    bitsandbytes' 8-bit Lion: one 8-bit moment (the sign of an interpolated momentum drives the step;
              its steps are all of size lr, so its lr is usually 3-10x below AdamW's)
  prodigy     the `prodigyopt` package: AdamW whose step size d is estimated on the fly; `optim.lr` multiplies
              that estimate (1.0 is the usual value). Four fp32 buffers per weight (two moments, s, the initial p0)
  adafactor   transformers' Adafactor at the recipe's lr (no relative step): a factored second moment, rows +
              columns of each matrix, and no first moment

`make_optimizer` builds one; `hyperparameters` are the recipe's values that a resumed run sets on the restored
optimizer; `state_bytes` counts what each keeps (the memory estimate's "optimizer state" row).
"""

from __future__ import annotations

import logging
import math

import torch

from amused_tune.recipe import OptimConfig, Recipe

log = logging.getLogger(__name__)

MIN_8BIT_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep fp32 state for smaller tensors
BLOCK_8BIT = 256  # one fp32 absmax per 256 elements per 8-bit state
DESCRIPTIONS = {
    "adamw": "AdamW: 2 x fp32 moments",
    "adamw8bit": "8-bit AdamW: 1 B/element/moment + block scales",
    "lion8bit": "8-bit Lion: 1 B/element + block scales",
    "prodigy": "Prodigy: 4 x fp32 per element",
    "adafactor": "Adafactor: factored 2nd moment",
}


def hyperparameters(o: OptimConfig) -> dict:
    """The recipe's values of every param group's keys, weight decay aside (set per group)."""
    name = o.resolved_name
    if name == "adafactor":
        return {}
    values = {"betas": tuple(o.betas)}
    if name in ("adamw", "adamw8bit", "prodigy"):
        values["eps"] = o.eps
    if name == "prodigy":
        values.update(d_coef=o.d_coef, use_bias_correction=o.use_bias_correction,
                      safeguard_warmup=o.resolved_safeguard_warmup)
    return values


def make_optimizer(recipe: Recipe, params: list) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names (with `optim.adam_8bit` meaning adamw8bit), over `params`: parameters
    (all decayed by `optim.weight_decay`), or param groups already split for weight decay (the trainer's
    `train.setup.param_groups`, which knows modules: no decay for biases and norms)."""
    o = recipe.optim
    groups = list(params) if params and isinstance(params[0], dict) else [{"params": list(params)}]
    groups = [{"weight_decay": o.weight_decay, **g} for g in groups]
    params = [p for g in groups for p in g["params"]]
    name, h = o.resolved_name, hyperparameters(o)
    if name == "adamw":
        fused = bool(params) and len({p.device.type for p in params}) == 1 and all(  # one kernel, no .item()
            p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
        return torch.optim.AdamW(groups, lr=o.lr, fused=fused or None, **h)
    if name in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
        return cls(groups, lr=o.lr, **h)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as err:
            from amused_tune.recipe import RecipeError

            raise RecipeError("optim.name=prodigy needs the prodigyopt package: pip install prodigyopt "
                              "(or pip install 'amused-tune[optim]')") from err
        if o.lr < 0.1:
            log.warning("optim.lr=%g with Prodigy: its lr multiplies the step size it estimates itself, so this "
                        "trains %gx slower than its usual lr 1.0 (to scale the estimate, set optim.d_coef)", o.lr, o.lr)
        return Prodigy(groups, lr=o.lr, **h)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=o.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Bytes of optimizer state `name` keeps for trainable tensors of these shapes."""
    total = 0
    if name in ("adamw8bit", "lion8bit"):
        moments = 2 if name == "adamw8bit" else 1
        total += moments * 256 * 4  # the 256-entry quantization map of each state
        for shape in shapes:
            n = math.prod(shape)
            total += moments * (4 * n if n < MIN_8BIT_SIZE else n + 4 * math.ceil(n / BLOCK_8BIT))
        return total
    for shape in shapes:
        n = math.prod(shape)
        if name == "adamw":
            total += 2 * 4 * n
        elif name == "prodigy":
            total += 4 * 4 * n
        else:  # adafactor: row and column statistics of a matrix (of its last two dims), a vector's own
            total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) if len(shape) >= 2 else 4 * n
    return total
