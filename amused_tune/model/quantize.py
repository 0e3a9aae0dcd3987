"""Quantized frozen base (QLoRA-style): hold the U-ViT's linear layers in bitsandbytes 8-bit or 4-bit.

`quantize_linear_layers(transformer, bits, compute_dtype)` swaps every `nn.Linear` of a module for a
bitsandbytes `Linear8bitLt` (LLM.int8, outlier threshold 6) or `Linear4bit` (NF4, double quantization) and moves
it to the GPU, which is when bitsandbytes quantizes the weights. Call it *before* attaching LoRA: peft then wraps
the quantized layers (its bnb LoRA layers keep the adapter in full precision and the base in 8/4 bits).

The trainer calls it from `setup_models` when `model.quantize` is set; the sampler reuses it for
`amused-tune sample --quantize`. CUDA only: bitsandbytes' CPU kernels exist but are slow and not what the kit
supports, so a CPU device is a RecipeError.
"""

from __future__ import annotations

import torch
from torch import nn

from amused_tune.recipe import RecipeError

BITS = {"8bit": 8, "4bit": 4}


def bits_of(setting: str | int) -> int:
    """`model.quantize` ("8bit" | "4bit") or 8 | 4 -> 8 | 4."""
    bits = BITS.get(setting, setting) if isinstance(setting, str) else setting
    if bits not in (4, 8):
        raise RecipeError(f"model.quantize={setting!r}: pass 8bit or 4bit")
    return int(bits)


def check_device(device: torch.device | str | None) -> torch.device:
    """The CUDA device to quantize onto; a RecipeError on anything else."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else f"the device is {device}"
        raise RecipeError(
            f"model.quantize needs a CUDA GPU (bitsandbytes quantization), but {where}: "
            "remove model.quantize (or pass --model.quantize=null) to train on the CPU"
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def quantizable(module: nn.Module, skip: tuple[str, ...] = (), under_lora: bool = False) -> list[tuple[str, nn.Linear]]:
    """The plain `nn.Linear` layers of `module` (not already quantized), minus names in `skip`.

    A module that already carries LoRA is refused (quantize first, so that peft picks its bitsandbytes layers),
    unless `under_lora`: then the adapters' own layers are kept and their base layers quantized (inference with
    unmerged adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not under_lora and any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        raise ValueError("quantize the base before attaching LoRA: this module already carries an adapter")
    found = []
    for name, child in module.named_modules():
        if type(child) is not nn.Linear:  # bitsandbytes' layers subclass nn.Linear: not matched
            continue
        if under_lora and ".lora_" in f".{name}":
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        found.append((name, child))
    return found


def quantized_copy(linear: nn.Linear, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights, still on the CPU (quantized when moved to CUDA)."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()  # the new layer is built on the meta device: no throw-away init
    if weight.device.type != "cpu":  # bitsandbytes quantizes on the move from CPU to CUDA
        weight = weight.cpu()
    bias = linear.bias is not None
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", compute_dtype), requires_grad=False)
    layer.requires_grad_(False)
    return layer


def quantize_linear_layers(
    module: nn.Module,
    bits: int | str,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    skip: tuple[str, ...] = (),
    *,
    under_lora: bool = False,
    allow_cpu: bool = False,
) -> int:
    """Replace `module`'s nn.Linear layers in place by bitsandbytes 8/4-bit layers on `device`; returns how many.

    Each layer is quantized as it moves to the GPU, one at a time, so the GPU never holds the full-precision
    weights. The rest of the module (norms, embeddings, convolutions) stays where it is: move it afterwards.
    `compute_dtype` is the dtype of the 4-bit matmuls and of the biases (the frozen base's dtype, e.g. bf16).
    `skip`: module names (or name suffixes) kept in full precision. `under_lora`: see `quantizable`.
    `allow_cpu` (tests only) quantizes with bitsandbytes' CPU kernels instead of raising.
    """
    bits = bits_of(bits)
    if allow_cpu:
        device = torch.device(device or "cpu")
    else:
        device = check_device(device)
    layers = quantizable(module, skip, under_lora)
    parents = dict(module.named_modules())
    for name, linear in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = parents[parent_name] if parent_name else module
        layer = quantized_copy(linear, bits, compute_dtype).to(device)
        setattr(parent, attr, layer)
        del linear
    # peft picks its bitsandbytes LoRA layers (dtype handling, correct merging) only when the model says so
    setattr(module, "is_loaded_in_8bit" if bits == 8 else "is_loaded_in_4bit", True)
    return len(layers)

