"""Values shared across the kit: where its files are, file names, dtypes and device placement.

Torch-free at import (the push command starts without torch); `torch_dtype` and `place` import it when called.

The kit's data folders (recipes/, datasets_cards/, assets/) live at the top of a source checkout. A built wheel
carries copies of them inside the package (amused_tune/kit/), so an installed kit finds them either way:
`kit_path("recipes")` is the checkout's folder when the package runs from a checkout, else the packaged copy.
"""

from __future__ import annotations

import json

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_ROOT = PACKAGE_DIR.parent  # the source checkout's top level (when running from one)
PACKAGED_KIT = PACKAGE_DIR / "kit"  # recipes/, datasets_cards/, assets/ copied into a built wheel
KIT_FOLDERS = ("recipes", "datasets_cards", "assets")
TOY_WEIGHTS_DIR = PACKAGE_DIR / "toy" / "weights"  # the shipped toy base (package data)

# adapter files, in diffusers' and peft's formats
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe a run writes into its output folder
METRICS_FILE = "metrics.jsonl"
ROUNDS_FILE = "styledrop.json"  # OUTPUT_DIR of a StyleDrop run of several rounds: its recipe and what each round kept

# the precisions a recipe or a command names (model.dtype, train.precision, --dtype): torch's name, bytes per value
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}
DTYPE_NAMES = tuple(DTYPES)
DTYPE_BYTES = {name: size for name, (_, size) in DTYPES.items()}

# how the guidance scale moves over the sampling steps (sampling.guidance draws them; validation and sample name them)
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine", "ramp1")


def kit_roots() -> list[Path]:
    """Folders that may hold the kit's data folders, in the order they are tried: the checkout, the packaged copy."""
    roots = [CHECKOUT_ROOT] if any((CHECKOUT_ROOT / name).is_dir() for name in KIT_FOLDERS) else []
    return roots + [PACKAGED_KIT]


def kit_path(relative: str | os.PathLike) -> Path:
    """The kit's file or folder `relative` (e.g. "recipes", "assets/x.png"): the first root that has it, else the
    first root's (missing) path, for the error message."""
    roots = kit_roots()
    for root in roots:
        if (root / relative).exists():
            return root / relative
    return roots[0] / relative


def looks_local(name: str) -> bool:
    """Whether a name that is no local file or folder was meant as one rather than as a Hub id (user/name): it is
    an absolute or relative path, has a weights file's suffix, more or fewer than one slash, or its first part is a
    folder here (`runs/typo` when runs/ exists)."""
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return True
    head, _, tail = name.partition("/")
    return Path(tail).suffix.lower() in (".safetensors", ".bin", ".pt", ".pth") or Path(head).is_dir()


def torch_dtype(name: str):
    """fp32 | fp16 | bf16 -> the torch dtype."""
    import torch

    return getattr(torch, DTYPES[name][0])


def place(module, device, dtype):
    """Move a module to `device` in `dtype`; cast only when it differs (diffusers warns on every cast).

    A narrowing cast (fp32 -> bf16) happens before the move, so the device never holds the wider copy: moving
    amused-256's U-ViT in fp32 and casting it there would peak at 2.4 GB of GPU memory instead of 1.2 GB.
    """
    current = next(module.parameters()).dtype
    if current != dtype and dtype.itemsize < current.itemsize:
        module.to(dtype)
        module.to(device)
    else:
        module.to(device)
        if current != dtype:
            module.to(dtype)
    return module


def yaml_error_words(err: Exception) -> str:
    """A YAML parse error in words, with what usually causes it: " at line L, column C: PROBLEM (HINT)". The line a
    parser reports is where it gave up, often far below the mistake: an unclosed quote or bracket is found only at
    the end of the file, so the hint names where the unclosed one opens."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or str(err).splitlines()[0]
    context, opened = getattr(err, "context", None) or "", getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    at = f"line {opened.line + 1}, column {opened.column + 1}" if opened else "a line above"
    if "quoted scalar" in context:
        hint = f"the quote opened at {at} is never closed: add the closing quote"
    elif "flow mapping" in context or "flow sequence" in context:
        bracket = "{" if "mapping" in context else "["
        hint = (f"the {bracket} opened at {at} is never closed, or a comma is missing between its items: close it "
                f"with {'}' if bracket == '{' else ']'}")
    elif "'\\t'" in problem:
        hint = "a tab character: YAML indents with spaces only"
    elif "mapping values are not allowed" in problem:
        hint = ("a value holding ': ' must be quoted, or this line is indented deeper than the key above it; "
                "else an unclosed quote or bracket above this line")
    else:
        hint = ("usually an unclosed quote or bracket above the reported line, or indentation that does not line up "
                "with the lines above")
    return f"{where}: {problem} ({hint})"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when it is absent); a line cut short by a killed process is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
