"""The optimizer registry: every optimizer a recipe can name (`optim.name`), defined once.

Each entry holds what the rest of the kit reads: the recipe schema its names (`optim.name`'s choices) and usual
lr and betas (what `Recipe.resolve` fills in), `--help` its description, the memory estimate the bytes of state it
keeps and how that row reads, the trainer how to build it (train.setup.make_optimizer) and which recipe keys its
param groups take (what a resumed run sets again). Torch-free to import (the schema reads it); building imports
the optimizer's package then.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MIN_8BIT_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep fp32 state for smaller tensors
BLOCK_8BIT = 256  # one fp32 absmax per 256 elements per 8-bit state


@dataclass(frozen=True)
class Optimizer:
    """One optimizer of the registry."""

    name: str
    help: str  # what it is, for `--help` and docs
    lr: float  # its usual peak lr (optim.lr unset)
    betas: tuple[float, float]  # its usual moment decay rates (optim.betas unset)
    state: str  # what its state holds: the memory estimate's row
    keys: tuple[str, ...]  # the optim keys of its param groups besides lr and weight decay
    tensor_bytes: Callable[[tuple[int, ...]], int]  # bytes of state it keeps for one trainable tensor
    build: Callable[[list, float, dict], object]  # (param groups, lr, values of `keys`) -> torch optimizer
    step_note: str  # what its step allocates on top of its state: the memory estimate's "optimizer step" moment
    package: str = ""  # the pip package it needs beyond the kit's own, for the error when missing
    fixed_bytes: int = 0  # bytes of state whatever the tensors (8-bit: the quantization maps)
    step_temporary: str = "gradients"  # gradients: one fp32 copy of the trainable weights; largest: of the largest
    # tensor; none: it updates in place

    def state_bytes(self, shapes: list[tuple[int, ...]]) -> int:
        """Bytes of state kept for trainable tensors of these shapes."""
        return self.fixed_bytes + sum(self.tensor_bytes(tuple(shape)) for shape in shapes)

    def step_bytes(self, grads: int, shapes: list[tuple[int, ...]]) -> int:
        """Bytes its step allocates on top of its state, given `grads` bytes of fp32 gradients (torch's AdamW and
        Prodigy: one fp32 copy of the trainable weights, an upper bound for the fused AdamW; Adafactor: one update
        of its largest tensor; the 8-bit ones nothing)."""
        if self.step_temporary == "none":
            return 0
        if self.step_temporary == "largest":
            return 4 * max((math.prod(shape) for shape in shapes), default=0)
        return grads


def _fp32(buffers: int) -> Callable[[tuple[int, ...]], int]:
    return lambda shape: buffers * 4 * math.prod(shape)


def _eight_bit(moments: int) -> Callable[[tuple[int, ...]], int]:
    def size(shape):
        n = math.prod(shape)
        return moments * (4 * n if n < MIN_8BIT_SIZE else n + 4 * math.ceil(n / BLOCK_8BIT))
    return size


def _factored(shape: tuple[int, ...]) -> int:
    """Adafactor: row and column statistics of a matrix (of its last two dims), a vector's own."""
    if len(shape) < 2:
        return 4 * math.prod(shape)
    return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])


def _adamw(groups, lr, values):
    import torch

    params = [p for g in groups for p in g["params"]]
    # one kernel and no host sync per weight when every trainable weight sits on one GPU, or on the CPU
    fused = bool(params) and len({p.device.type for p in params}) == 1 and all(
        p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None, **values)


def _bnb(cls_name: str):
    def build(groups, lr, values):
        import bitsandbytes as bnb

        return getattr(bnb.optim, cls_name)(groups, lr=lr, **values)
    return build


def _prodigy(groups, lr, values):
    from prodigyopt import Prodigy

    if lr < 0.1:
        log.warning("optim.lr=%g with Prodigy: its lr multiplies the step size it estimates itself, so this "
                    "trains %gx slower than its usual lr 1.0 (to scale the estimate, set optim.d_coef)", lr, lr)
    return Prodigy(groups, lr=lr, **values)


def _adafactor(groups, lr, values):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, **values)


REGISTRY = {o.name: o for o in (
    Optimizer("adamw", "torch's AdamW (fused: one kernel on a GPU or the CPU)", 8.0e-4, (0.9, 0.999), "AdamW: 2 x fp32 moments",
              ("betas", "eps"), _fp32(2), _adamw, "AdamW's fp32 temporary"),
    Optimizer("adamw8bit", "bitsandbytes' 8-bit AdamW, ~75% less optimizer memory", 8.0e-4, (0.9, 0.999),
              "8-bit AdamW: 1 B/element/moment + block scales", ("betas", "eps"), _eight_bit(2),
              _bnb("AdamW8bit"), "8-bit optimizer updates in place", fixed_bytes=2 * 256 * 4, step_temporary="none"),
    Optimizer("lion8bit", "bitsandbytes' 8-bit Lion: one 8-bit moment, every weight moves by lr (usually 3-10x "
              "below AdamW's)", 1.0e-4, (0.9, 0.99), "8-bit Lion: 1 B/element + block scales", ("betas",),
              _eight_bit(1), _bnb("Lion8bit"), "8-bit optimizer updates in place", fixed_bytes=256 * 4,
              step_temporary="none"),
    Optimizer("prodigy", "the prodigyopt package: AdamW that estimates its own step size; lr multiplies the "
              "estimate", 1.0, (0.9, 0.999), "Prodigy: 4 x fp32 per element",
              ("betas", "eps", "d_coef", "use_bias_correction", "safeguard_warmup"), _fp32(4), _prodigy,
              "Prodigy's fp32 temporary", package="prodigyopt (or pip install 'amused-tune[optim]')"),
    Optimizer("adafactor", "transformers' Adafactor at a fixed lr: a factored second moment, no first moment, "
              "least memory", 8.0e-4, (0.9, 0.999), "Adafactor: factored 2nd moment", (), _factored, _adafactor,
              "Adafactor: one tensor's update", step_temporary="largest"),
)}
NAMES = tuple(REGISTRY)


def described() -> str:
    """Every optimizer with its description and usual lr, as `--help` shows them."""
    return "; ".join(f"{o.name} ({o.help}; lr {o.lr:g})" for o in REGISTRY.values())


def state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Bytes of optimizer state `name` keeps for trainable tensors of these shapes."""
    return REGISTRY[name].state_bytes(shapes)


def hyperparameters(o) -> dict:
    """The values an optim section (recipe.OptimConfig) gives the keys of its optimizer's param groups (weight decay
    aside: set per group); what a resumed run sets on the restored optimizer."""
    values = {key: getattr(o, key) for key in REGISTRY[o.resolved_name].keys}
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    if "safeguard_warmup" in values:
        values["safeguard_warmup"] = o.resolved_safeguard_warmup
    return values
