"""Checks a command runs on its inputs before it loads a model: one line that says what to fix, never a traceback.

Each check returns None when the input is usable, else the message (the caller prints it as its error line).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from amused_tune.common import looks_local, yaml_error_words


def did_you_mean(word: str, choices) -> str:
    """" did you mean X?" for the closest of `choices`, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" did you mean {close[0]}?" if close else ""


def read_yaml(path: str | os.PathLike, what: str = "") -> dict:
    """A YAML file that must hold a mapping; raises ValueError naming the file (and line) when it does not."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{label} is not valid YAML{yaml_error_words(err)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{label} is not a text file: pass a YAML file") from None
    if values is None:
        raise ValueError(f"{label} is empty: it must hold the recipe's sections (model:, data:, train:, ...)")
    if not isinstance(values, dict):
        raise ValueError(f"{label} must be a mapping of sections (model:, data:, train:, ...), "
                         f"not a {type(values).__name__}")
    return values


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a readable .safetensors file (a truncated, empty or renamed file), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"{path} is not a valid .safetensors file ({reason}): pass the adapter a run wrote "
                "(OUTPUT_DIR/adapter/pytorch_lora_weights.safetensors) or download it again")
    return None


def adapter_problem(source: str, allow_pickle: bool = False) -> str | None:
    """Why a local adapter (run dir, adapter dir or file) cannot be read, or None. Hub ids are checked on loading."""
    from amused_tune.model.adapters import AdapterError, resolve_adapter

    path = Path(source).expanduser()
    if not path.exists():
        if looks_local(source):
            return (f"{source} does not exist: pass a run's output.dir, an adapter folder, a .safetensors file or "
                    "a Hub id (user/name)")
        return None  # a Hub id: checked when it is loaded
    try:
        file, _ = resolve_adapter(path, allow_pickle=allow_pickle)
    except AdapterError as err:
        return str(err)
    return None if file.suffix != ".safetensors" else safetensors_problem(file)


def image_problem(flag: str, path: str) -> str | None:
    """Why the file given with `flag` is not an image PIL can read, or None."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if file.is_dir():
        return f"{flag} {path} is a folder: pass an image file"
    if not file.is_file():
        return f"{flag} {path}: no such file"
    try:
        with Image.open(file) as image:
            image.load()
    except UnidentifiedImageError:
        return f"{flag} {path} is not an image (PIL cannot read it): pass a PNG, JPEG or WebP file"
    except Exception as err:  # noqa: BLE001 - truncated or corrupt files raise several error types
        return f"{flag} {path} is not an image PIL can read ({type(err).__name__}: {err})"
    return None


def folder_problem(flag: str, path: str | os.PathLike) -> str | None:
    """Why the output folder given with `flag` cannot be written (it is a file, or lies under one), or None."""
    folder = Path(path).expanduser()
    if folder.is_file():
        return f"{flag} {path} is a file: pass a folder (it is created if missing)"
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {path} is not writable: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK):
                return f"{flag} {path} is not writable: {parent} is read-only"
            break
    return None
