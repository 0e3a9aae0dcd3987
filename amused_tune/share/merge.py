"""Merge (the library part of `amused-tune merge`): fuse a run's LoRA into its base U-ViT and save a full aMUSEd pipeline folder.

  amused-tune merge OUTPUT_DIR --out DIR [--base BASE] [--scale 1.0] [--dtype fp32|fp16|bf16] [--overwrite]

DIR holds transformer/, vqvae/, text_encoder/, tokenizer/, scheduler/ and model_index.json: diffusers'
`AmusedPipeline.from_pretrained(DIR)` loads it, and so does the kit (`model.base: DIR`, `amused-tune sample --base
DIR`). The base model is the one the weights recorded (amused_tune.model.provenance: amused_tune.json, the LoRA file's
metadata, else OUTPUT_DIR/recipe.yaml) unless --base names another. DIR/sampling.json keeps the base's sampling
settings with the run's validated ones over them, so DIR samples at its defaults as base + adapter do. A
text-encoder LoRA, when the run trained one, is fused into the text encoder too. A full fine-tuning run
(OUTPUT_DIR/transformer/) is "merged" by putting its U-ViT into the base pipeline.

OUTPUT_DIR may also be an adapter folder or a .safetensors file (diffusers' or peft's format); --base is needed
only when it records no base.
DIR is written aside and renamed into place, so an interrupted merge leaves no half-written folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from amused_tune.common import place, torch_dtype
from amused_tune.model.provenance import loadable_base, merged_sampling_file, read_record, same_base
from amused_tune.model.sampling_defaults import sampling_defaults
from amused_tune.writes import folder_aside


class MergeError(ValueError):
    """A merge that cannot happen; the message says what to pass instead."""


def text_encoder_source(source: Path):
    """Where the text encoder's LoRA of `source` is (a file or a peft folder), or None when it has none."""
    from safetensors import safe_open

    from amused_tune.model.adapters import PEFT_FILE, resolve_adapter

    file, fmt = resolve_adapter(source)
    if fmt == "diffusers":
        with safe_open(file, framework="pt") as f:
            return file if any(k.startswith("text_encoder.") for k in f.keys()) else None
    folder = file.parent / "text_encoder"
    return folder if (folder / PEFT_FILE).is_file() else None


def choose_base(run: Path, base: str | None) -> tuple[str, dict | None]:
    """(the base to merge into, the run's record of its base and sampling settings). `base` (--base) wins; else the
    base the weights recorded (amused_tune.json, the LoRA file's metadata, the run's recipe.yaml)."""
    record = read_record(run)
    if base:
        return base, record
    if record is None:
        raise MergeError(f"{run} records no base model (no amused_tune.json, adapter metadata or recipe.yaml naming "
                         "it): pass --base (a Hub id, a pipeline folder, toy or tiny)")
    return loadable_base(record), record


def trained_on(record: dict | None, base: str) -> bool:
    """Whether the record says the weights were trained on `base`."""
    return bool(record) and (same_base(base, record["base"]) or same_base(base, loadable_base(record)))


def fuse(comps, run: Path, scale: float) -> None:
    """Put the run's weights into `comps`: its full U-ViT, or its LoRA (U-ViT and text encoder) folded in."""
    from amused_tune.model import adapters
    if (run / "transformer" / "config.json").is_file() and not (run / "adapter").is_dir():
        comps.transformer = load_full_transformer(run / "transformer")
        return
    adapters.load_lora(comps.transformer, run, scale=scale, adapter_name="merged")
    adapters.merge_adapters(comps.transformer)
    te = text_encoder_source(run)
    if te is not None:
        adapters.load_lora(comps.text_encoder, te, scale=scale, adapter_name="merged", part="text_encoder")
        adapters.merge_adapters(comps.text_encoder)


def load_full_transformer(folder: Path):
    """A full fine-tuning run's U-ViT, from .safetensors only (like every loader of the kit: no pickle)."""
    from diffusers import UVit2DModel

    try:
        return UVit2DModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, EnvironmentError, ValueError) as err:
        raise MergeError(f"{folder} holds no .safetensors weights (the kit loads no pickle files): re-save it with "
                         "save_pretrained(safe_serialization=True)") from err


def merge_run(run: str | os.PathLike, out: str | os.PathLike, base: str | None = None, scale: float = 1.0,
              dtype: str = "fp32", overwrite: bool = False):
    """Build the merged pipeline and write it to `out`; returns the merged `Components`."""
    from amused_tune.model import adapters
    from amused_tune.model.bases import BaseModelError, load_components

    explicit = base is not None
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not run.exists():
        raise MergeError(f"{run} does not exist: pass a run's output.dir, an adapter folder or a .safetensors file")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise MergeError(f"--out {out} would overwrite the run it merges: pick another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(f"--out {out} exists and is not empty: pick another folder or pass --overwrite")
    base, record = choose_base(run, base)
    try:
        comps = load_components(base)
    except BaseModelError as err:
        hint = f" (the base {run} was trained on; pass --base to use another)" if record and not explicit else ""
        raise MergeError(f"{err}{hint}") from err

    try:
        fuse(comps, run, scale)
    except adapters.AdapterError as err:
        recorded = (record or {}).get("base")
        hint = (f" (it was trained on {recorded}: pass --base {recorded}, or leave --base out)"
                if explicit and recorded and not trained_on(record, base) else "")
        raise adapters.AdapterError(f"{err}{hint}") from err
    for name in ("transformer", "vqvae", "text_encoder"):
        place(getattr(comps, name), "cpu", torch_dtype(dtype))

    with folder_aside(out, "the merged pipeline") as tmp:
        comps.save_pretrained(tmp)
        # what the base knew about sampling, and what the run was validated with, stay with the merged weights
        merged_sampling_file(tmp, sampling_defaults(base), record if trained_on(record, base) else None)
    return comps
