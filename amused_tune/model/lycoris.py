"""LoKr and LoHa adapters (peft's LyCORIS kinds): their peft config, and reading one back from peft's format.

A LoKr update of a weight is the Kronecker product of two small matrices (the larger one itself low-rank when
`rank` is small against the weight); a LoHa update is the element-wise (Hadamard) product of two rank-`rank`
products. Both are scaled by alpha / rank, like a LoRA. diffusers' ``AmusedLoraLoaderMixin`` reads LoRA and DoRA
only, so these kinds are saved in peft's format alone (``adapter_config.json`` + ``adapter_model.safetensors``);
the kit's sampler and merge load them through `amused_tune.model.adapters.load_lora`.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import LoHaConfig, LoKrConfig
from peft.tuners.lycoris_utils import LycorisConfig, LycorisLayer  # noqa: F401 (the layer type, for adapters)

KINDS = {"lokr": LoKrConfig, "loha": LoHaConfig}
PEFT_TYPES = {"LOKR": LoKrConfig, "LOHA": LoHaConfig}
WEIGHT_PREFIXES = ("lokr_", "hada_")


def lycoris_config(kind: str, rank: int, alpha: float, targets) -> LycorisConfig:
    """peft's config for `kind` (lokr or loha) on `targets`: r = rank, alpha = alpha, the update starting at zero
    (LoKr's decompose factor and dropouts at peft's defaults)."""
    return KINDS[kind](r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)


def is_lycoris(config) -> bool:
    return isinstance(config, LycorisConfig)


def kind_of(config_dict: dict) -> str | None:
    """"lokr" / "loha" for a peft adapter_config.json of that kind, else None."""
    cls = PEFT_TYPES.get(str(config_dict.get("peft_type", "")).upper())
    return next((k for k, c in KINDS.items() if c is cls), None)


def config_from_dict(config_dict: dict, state: dict[str, torch.Tensor]) -> LycorisConfig:
    """The config of a saved LoKr / LoHa adapter, targeting exactly the modules its weights belong to."""
    cls = PEFT_TYPES[str(config_dict["peft_type"]).upper()]
    names = {f.name for f in dataclasses.fields(cls) if f.init} - {"peft_type", "target_modules", "task_type"}
    kwargs = {k: v for k, v in config_dict.items() if k in names}
    return cls(**kwargs, target_modules=modules_of(state))


def modules_of(state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a LoKr / LoHa state dict (keys ``<module>.lokr_w1`` ...) adapts."""
    return sorted({k.rsplit(".", 1)[0] for k in state if k.rsplit(".", 1)[-1].startswith(WEIGHT_PREFIXES)})
