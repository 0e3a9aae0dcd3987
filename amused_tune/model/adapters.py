"""LoRA adapters: attach for training, save in diffusers' and peft's formats, load from anywhere, merge.

Formats written by `save_lora(out_dir, ...)`:

- ``pytorch_lora_weights.safetensors``: diffusers' format (keys ``transformer.<module>.lora_A.weight``), with the
  peft config of each part in the safetensors metadata (``lora_adapter_metadata``), so that
  ``AmusedLoraLoaderMixin.lora_state_dict(dir, return_lora_metadata=True)`` recovers ``lora_alpha``: an adapter
  reloads at the strength it was trained at.
- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's format for the U-ViT (``PeftModel.from_pretrained``);
  the text encoder's LoRA, when trained, goes to ``text_encoder/`` in the same format.

LoKr and LoHa adapters (`amused_tune.model.lycoris`) go through the same functions, in peft's format only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from amused_tune.model import lycoris
from amused_tune.common import DIFFUSERS_FILE, PEFT_CONFIG, PEFT_FILE  # noqa: F401 (the adapter files)

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_PREFIXES = ("lora_", *lycoris.WEIGHT_PREFIXES)  # how the trained tensors of each kind are named


class AdapterError(ValueError):
    """An adapter that cannot be loaded into this model; the message says why."""


def attach_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v"),
    dropout: float = 0.0,
    adapter_name: str = "default",
    kind: str = "lora",
) -> LoraConfig:
    """Inject an adapter of `kind` (adapter.kind) into every module named in `targets`: "lora", "dora" (a LoRA plus
    a trained magnitude per output row), "lokr" / "loha" (peft's LoKr / LoHa, with r = rank, no input dropout);
    only the adapter's weights stay trainable."""
    if kind in lycoris.KINDS:
        config = lycoris.lycoris_config(kind, rank, alpha, targets)
    else:
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, init_lora_weights=True,
            use_dora=kind == "dora",
        )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    _remember_config(model, adapter_name, config)
    for name, param in model.named_parameters():
        if any(p in name for p in WEIGHT_PREFIXES) and f".{adapter_name}." in f"{name}.":
            param.requires_grad_(True)
    return config


def _remember_config(model: torch.nn.Module, adapter_name: str, config: LoraConfig) -> None:
    configs = getattr(model, "_amused_lora_configs", {})
    configs[adapter_name] = config
    model._amused_lora_configs = configs


def lora_config(model: torch.nn.Module, adapter_name: str = "default") -> LoraConfig:
    return model._amused_lora_configs[adapter_name]


def lora_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def lora_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed by module (``<module>.lora_A.weight``), as contiguous fp32 CPU tensors."""
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def save_lora(
    out_dir: str | os.PathLike,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    adapter_name: str = "default",
    base_model: str | None = None,
    record: dict | None = None,
) -> Path:
    """Write the adapter in diffusers' format (alpha in the metadata; LoRA and DoRA only, which diffusers loads)
    and in peft's format. Returns `out_dir`.

    `record` (amused_tune.model.provenance: the base and the sampling settings) goes into the safetensors metadata and
    into amused_tune.json beside the weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"transformer": transformer}
    if text_encoder is not None and lora_modules(text_encoder):
        parts["text_encoder"] = text_encoder

    packed: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for prefix, model in parts.items():
        config = lora_config(model, adapter_name)
        for key, value in lora_state_dict(model, adapter_name).items():
            packed[f"{prefix}.{key}"] = value
        for key, value in _config_dict(config, base_model).items():
            metadata[f"{prefix}.{key}"] = value
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    if record is not None:
        from amused_tune.model.provenance import METADATA_KEY as RECORD_KEY, write_record

        header[RECORD_KEY] = json.dumps(record, sort_keys=True)
        write_record(out, record)
    if not any(lycoris.is_lycoris(lora_config(m, adapter_name)) for m in parts.values()):
        save_file(packed, out / DIFFUSERS_FILE, metadata=header)

    for prefix, model in parts.items():
        folder = out if prefix == "transformer" else out / prefix
        folder.mkdir(parents=True, exist_ok=True)
        weights = {f"base_model.model.{k}": v for k, v in lora_state_dict(model, adapter_name).items()}
        save_file(weights, folder / PEFT_FILE, metadata={"format": "pt"})
        (folder / PEFT_CONFIG).write_text(json.dumps(_config_dict(lora_config(model, adapter_name), base_model), indent=2))
    return out


def _config_dict(config: LoraConfig, base_model: str | None) -> dict:
    d = config.to_dict()
    d["base_model_name_or_path"] = base_model
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------- loading


def resolve_adapter(source: str | os.PathLike, allow_pickle: bool = False) -> tuple[Path, str]:
    """Find the adapter file behind `source` and its format ("diffusers" or "peft").

    `source` is a run's output dir, an ``adapter/`` dir (either format), a ``.safetensors`` file, or a Hub repo id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        for folder in (path / "adapter", path):
            if (folder / DIFFUSERS_FILE).is_file():
                return folder / DIFFUSERS_FILE, "diffusers"
            if (folder / PEFT_FILE).is_file() and (folder / PEFT_CONFIG).is_file():
                return folder / PEFT_FILE, "peft"
        pickled = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled and allow_pickle:
            return pickled[0], "diffusers"
        if pickled:
            raise AdapterError(
                f"{path} holds only pickle weights ({pickled[0].name}), which can run code when loaded: convert "
                "them to .safetensors or pass --allow-pickle if you trust their author"
            )
        raise AdapterError(f"{path} holds no LoRA adapter ({DIFFUSERS_FILE} or {PEFT_FILE} + {PEFT_CONFIG})")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise AdapterError(
                f"{path} is a pickle file, which can run code when loaded: convert it to .safetensors "
                "or pass --allow-pickle if you trust its author"
            )
        return path, ("peft" if (path.name == PEFT_FILE and (path.parent / PEFT_CONFIG).is_file()) else "diffusers")
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(str(source), DIFFUSERS_FILE)), "diffusers"
        except Exception as err:
            raise AdapterError(f"adapter {source!r} is neither a local path nor a loadable Hub repo: {err}") from err
    raise AdapterError(f"adapter {source!r} does not exist: pass a run dir, an adapter dir or a .safetensors file")


def read_adapter(
    source: str | os.PathLike, part: str = "transformer", allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Read one part's LoRA weights (keys ``<module>.lora_A.weight``) and its config, from any supported format.

    Files without alpha metadata (diffusers' ``train_amused.py`` writes none) get alpha = rank, with a warning.
    """
    file, fmt = resolve_adapter(source, allow_pickle)
    if fmt == "peft" and part != "transformer":  # peft keeps each part in its own folder: <adapter>/<part>/
        part_dir = file.parent / part
        if not (part_dir / PEFT_FILE).is_file():
            raise AdapterError(f"{file.parent} has no LoRA weights for the {part} ({part}/{PEFT_FILE})")
        file = part_dir / PEFT_FILE
    if file.suffix in PICKLE_SUFFIXES:
        raw = torch.load(file, map_location="cpu", weights_only=True)
        meta: dict = {}
    else:
        raw = load_file(file)
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
    if fmt == "peft":
        state = {k.removeprefix("base_model.model."): v for k, v in raw.items()}
        config_dict = json.loads((file.parent / PEFT_CONFIG).read_text())
    else:
        prefix = f"{part}."
        state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        packed = json.loads(meta.get(METADATA_KEY, "{}"))
        config_dict = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
    if not state:
        raise AdapterError(f"{file} has no LoRA weights for the {part}")
    if lycoris.kind_of(config_dict):  # LoKr / LoHa: peft's format only, its config as saved
        return state, lycoris.config_from_dict(config_dict, state)
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in state.items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise AdapterError(f"{file} mixes LoRA ranks {sorted(ranks)}; per-module ranks are not supported")
    rank = ranks.pop()
    if "lora_alpha" not in config_dict:
        log.warning("%s stores no lora_alpha: treating alpha = rank = %d (diffusers' train_amused.py convention)", file, rank)
    config = LoraConfig(
        r=int(config_dict.get("r", rank)),
        lora_alpha=float(config_dict.get("lora_alpha", rank)),
        target_modules=modules,
        lora_dropout=0.0,
        use_dora=bool(config_dict.get("use_dora")) or any(".lora_magnitude_vector" in k for k in state),
    )
    return state, config


def _expected_lora_shape(module: torch.nn.Module, key: str, rank: int) -> tuple[int, ...]:
    """The shape peft gives `key` (lora_A / lora_B / DoRA magnitude) on `module`, a Linear or a Conv2d."""
    if isinstance(module, torch.nn.Conv2d):  # A: a conv with the module's kernel into r channels; B: 1x1 back out
        if ".lora_magnitude_vector" in key:
            return (1, module.out_channels, 1, 1)
        if ".lora_A." in key:
            return (rank, module.in_channels // module.groups, *module.kernel_size)
        return (module.out_channels, rank, 1, 1)
    if ".lora_magnitude_vector" in key:
        return (module.out_features,)
    return (rank, module.in_features) if ".lora_A." in key else (module.out_features, rank)


def load_lora(
    model: torch.nn.Module,
    source: str | os.PathLike,
    scale: float = 1.0,
    adapter_name: str | None = None,
    allow_pickle: bool = False,
    part: str = "transformer",
) -> str:
    """Inject the adapter at `source` into `model` (a U-ViT, or the text encoder with part="text_encoder").

    Returns the adapter's name. A file made for another base model (unknown modules) or another shape is refused.
    """
    state, config = read_adapter(source, part, allow_pickle)
    names = dict(model.named_modules())
    missing = [m for m in config.target_modules if m not in names]
    if missing:
        raise AdapterError(
            f"adapter {source} was trained on another base model: {len(missing)} of its modules "
            f"(e.g. {missing[0]}) do not exist in this {part}"
        )
    for key, value in state.items() if not lycoris.is_lycoris(config) else ():  # LoKr / LoHa: peft checks shapes
        expected = _expected_lora_shape(names[key.rsplit(".lora_", 1)[0]], key, config.r)
        if tuple(value.shape) != expected:
            raise AdapterError(
                f"adapter {source}: {key} has shape {tuple(value.shape)}, this {part} needs "
                f"{expected} (another base model or a corrupt file)"
            )
    existing = getattr(model, "_amused_lora_configs", {})
    name = adapter_name or f"adapter_{len(existing)}"
    if name in existing:
        raise AdapterError(f"an adapter named {name!r} is already loaded")
    inject_adapter_in_model(config, model, adapter_name=name)
    _remember_config(model, name, config)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterError(f"adapter {source}: {len(unexpected)} weights did not match the model, e.g. {unexpected[0]}")
    model.requires_grad_(False)
    set_adapter_scales(model, {name: scale})
    return name


def set_adapter_scales(model: torch.nn.Module, scales: dict[str, float]) -> None:
    """Activate exactly the named adapters, each at its scale (1.0 = the strength it was trained at)."""
    names = list(scales)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(names)
            for name, scale in scales.items():
                if name in module.lora_A:
                    module.scaling[name] = scale * module.lora_alpha[name] / module.r[name]
        elif isinstance(module, lycoris.LycorisLayer):
            module.set_adapter(names)
            for name, scale in scales.items():
                module.set_scale(name, scale)  # scale * alpha / r, for the adapters this layer holds
    model.requires_grad_(False)


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the active adapters into the base weights and remove the LoRA layers (faster sampling, plain model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):  # LoRA, DoRA, LoKr, LoHa
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "_amused_lora_configs"):
        del model._amused_lora_configs
    return model
