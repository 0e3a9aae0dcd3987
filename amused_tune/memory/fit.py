"""`--max-memory SIZE`: turn on the kit's memory levers until a recipe's predicted peak fits (docs/memory.md).

The order: frozen weights in bf16 (`model.dtype`), the cache (`data.cache`), gradient checkpointing, 8-bit AdamW,
a quantized base for LoRA (`model.quantize` 8bit, then 4bit), then a smaller micro-batch with more accumulation.
Levers the final recipe does not need are dropped again. The effective batch, the lr and the data never change.
"""

from __future__ import annotations

import copy
import re

from amused_tune.memory.estimate import CUDA_CONTEXT_GB, GB, EstimateError, estimate


def parse_size(text: str) -> int:
    """'6GB', '6', '6.5G', '800MB', '6GiB' -> bytes (GB = 10^9 bytes, GiB = 2^30); EstimateError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise EstimateError(f"--max-memory {text!r}: pass a size such as 6GB, 7.5GB or 800MB")
    unit = {"gib": 2**30, "mib": 2**20, "mb": 10**6, "m": 10**6}.get(m.group(2) or "gb", GB)
    return int(float(m.group(1)) * unit)


def _levers(recipe) -> list[tuple[str, object, bool]]:
    """The kit's memory levers in the order --max-memory tries them: (key, value, already on)."""
    lora = recipe.adapter.kind in ("lora", "dora")  # the kinds that can wrap a quantized base
    return [
        ("model.dtype", "bf16", recipe.model.dtype != "fp32"),
        ("data.cache", True, recipe.data.cache),
        ("train.grad_checkpointing", True, recipe.train.grad_checkpointing),
        ("optim.adam_8bit", True, recipe.optim.adam_8bit),
        ("model.quantize", "8bit", not lora or recipe.model.quantize is not None),
        ("model.quantize", "4bit", not lora or recipe.model.quantize == "4bit"),
    ]


def _set(recipe, key: str, value):
    section, name = key.split(".")
    out = copy.deepcopy(recipe)
    setattr(getattr(out, section), name, value)
    return out


def _smaller_batches(recipe):
    """The recipe at each smaller micro-batch that divides its batch, accumulation raised to keep the product."""
    b, a = recipe.train.batch_size, recipe.train.grad_accum
    for d in range(b - 1, 0, -1):
        if b % d == 0:
            out = _set(recipe, "train.batch_size", d)
            out.train.grad_accum = a * (b // d)
            yield out


def _with(recipe, levers: list[tuple[str, object]]):
    for key, value in levers:
        recipe = _set(recipe, key, value)
    return recipe


def fit(recipe, budget: int, say=print):
    """The recipe with the kit's levers turned on, in order, until the predicted peak plus the CUDA context fits
    in `budget` bytes, then a smaller micro-batch with more accumulation; levers that turn out not to be needed
    are dropped again. `say` gets one line per change. Never changes the effective batch, the lr or the data.
    Raises EstimateError when nothing fits."""
    usable = budget - int(CUDA_CONTEXT_GB * GB)
    first = estimate(recipe)
    if first.peak_bytes <= usable:
        return recipe
    chosen, current, est = [], recipe, first
    for key, value, already in _levers(recipe):
        if already or est.peak_bytes <= usable:
            continue
        candidate = estimate(_set(current, key, value))
        if any(candidate.at(m) < est.at(m) for m in est.moments if m in candidate.moments):  # it saves something
            chosen.append((key, value))
            current, est = _set(current, key, value), candidate
    for smaller in _smaller_batches(current) if est.peak_bytes > usable else ():
        current, est = smaller, estimate(smaller)
        if est.peak_bytes <= usable:
            break
    if est.peak_bytes > usable:
        raise EstimateError(
            f"nothing fits in {budget / GB:.1f} GB: with every memory lever on the predicted peak is "
            f"{est.peak_gb:.2f} GB (+ {CUDA_CONTEXT_GB} GB for the CUDA context); use a GPU with more memory"
            + (" or LoRA (adapter.kind=lora) instead of full fine-tuning" if recipe.adapter.kind == "full" else ""))
    batch = (current.train.batch_size, current.train.grad_accum)
    for lever in reversed(list(chosen)):  # drop what the final recipe does not need, last lever first
        kept = [c for c in chosen if c != lever]
        trial = _with(recipe, kept)
        trial.train.batch_size, trial.train.grad_accum = batch
        if estimate(trial).peak_bytes <= usable:
            chosen, current = kept, trial
    for key, value in chosen:
        section, name = key.split(".")
        say(f"--max-memory: {key}: {getattr(getattr(recipe, section), name)} -> {value}")
    if batch != (recipe.train.batch_size, recipe.train.grad_accum):
        say(f"--max-memory: train.batch_size x train.grad_accum: {recipe.train.batch_size} x "
            f"{recipe.train.grad_accum} -> {batch[0]} x {batch[1]} (same effective batch)")
    say(f"--max-memory: predicted peak {first.peak_gb:.2f} -> {estimate(current).peak_gb:.2f} GB "
        f"(fits {budget / GB:g} GB with {CUDA_CONTEXT_GB} GB for the CUDA context)")
    return current
