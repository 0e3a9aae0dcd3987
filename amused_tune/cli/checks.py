"""Checks a command runs on its inputs before it loads a model: one line that says what to fix, never a traceback.

Each check returns None when the input is usable, else the message (the caller prints it as its error line).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from amused_tune.common import yaml_error_words


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
        return None  # a Hub id, or a path the loader reports as missing
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


def data_path_problem(data) -> str | None:
    """Why a recipe's local data.path (after its card) cannot be trained on, or None (Hub ids are checked on loading,
    other data problems when the data is read)."""
    from amused_tune.data.cards import DataError, resolve_config
    from amused_tune.data.sources import resolve_path

    try:
        cfg = resolve_config(data)
        if cfg.sources:  # data.sources: the first source with a problem
            from amused_tune.data.mixture import part_configs

            return next(filter(None, (data_path_problem(part) for part, _ in part_configs(cfg))), None)
    except DataError as err:
        return str(err)
    if not str(cfg.path).strip():
        return "data.path is empty: set it to your images (a folder, or one image for data.source=single_image)"
    if cfg.source != "hub" and not resolve_path(cfg.path).exists():
        return (f"data.path={cfg.path} does not exist: set data.path in the recipe to your images (a folder, or one "
                "image for data.source=single_image), or pass --data.path=...")
    return None if cfg.source == "hub" else source_problem(cfg.source, cfg.path, resolve_path(cfg.path))


def fitting_source(path: Path) -> str:
    """The data.source that reads what is at `path`, as a hint ("--data.source=... (why)"), or ""."""
    from amused_tune.data.sources import IMAGE_SUFFIXES

    if path.is_file():
        return ('--data.source=single_image --data.prompt="its caption" (one image)'
                if path.suffix.lower() in IMAGE_SUFFIXES else "")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "--data.source=hub (a dataset saved with save_to_disk)"
    if (path / "metadata.jsonl").is_file():
        return "--data.source=folder (it has a metadata.jsonl; imagefolder reads it too)"
    if next(path.rglob("*.txt"), None) is not None:
        return "--data.source=folder (it has .txt captions; captionfolder reads them too)"
    return ""


def source_problem(source: str, shown: str, path: Path) -> str | None:
    """Why data.source cannot read what is at data.path (a file for a folder source, a folder for single_image, a
    folder without the captions the source expects), with the source that fits; None when it can."""
    fits = fitting_source(path)
    hint = f": use {fits}" if fits else ""
    if source == "single_image" and path.is_dir():
        return (f"data.path={shown} is a folder, but data.source=single_image needs one image file"
                f"{hint or ': for a folder of captioned images use --data.source=folder (a .txt per image, or a metadata.jsonl)'}")
    if source != "single_image" and path.is_file():
        return f"data.path={shown} is a file, but data.source={source} needs a folder{hint or ': pass a folder'}"
    if source == "imagefolder" and not (path / "metadata.jsonl").is_file():
        add = ': add one ({"file_name": ..., "text": ...} per line) or use data.source=captionfolder with a .txt per image'
        return f"data.path={shown} has no metadata.jsonl, which data.source=imagefolder reads{hint or add}"
    if source == "captionfolder" and "metadata.jsonl" in fits:
        return f"data.path={shown} has no .txt captions, which data.source=captionfolder reads{hint}"
    return None


SMALL_WORDS = {"a", "an", "the", "in", "on", "of", "with", "and", "at", "by", "to", "for", "from"}


def validation_prompts_from_data(recipe) -> list[str]:
    """Fill validation.prompts from the data when the recipe gives none and asks for validation.from_data, and warn
    about words of the validation prompts that no caption contains (a trigger word the grid will never show). Only
    local folder sources are read (listing, not decoding); returns the lines to say, "warning: ..." ones first."""
    import re

    from amused_tune.data.cards import DataError, resolve_config
    from amused_tune.data.sources import open_source

    v = recipe.validation
    try:
        cfg = resolve_config(recipe.data)
        if cfg.sources or cfg.source in ("hub", "single_image") or not (v.from_data or v.prompts):
            return []
        captions = [cfg.prompt] if cfg.prompt else [r.caption.strip() for r in open_source(cfg).records
                                                      if r.caption and r.caption.strip()]
    except (DataError, OSError):  # said, with its reason, when the data is read
        return []
    said = []
    if not v.prompts and v.from_data and captions:
        v.prompts = list(dict.fromkeys(captions))[:v.from_data]
        said.append(f"validation: no prompts given: the data's first caption{'s' if len(v.prompts) > 1 else ''}, "
                    + "; ".join(f"`{p}`" for p in v.prompts))
    words = re.compile(r"\[[^\]]*\]|[\w'-]+")
    known = {w.lower() for c in captions for w in words.findall(c)}
    for prompt in v.prompts:
        unseen = [w for w in dict.fromkeys(words.findall(prompt)) if w.lower() not in known | SMALL_WORDS]
        if unseen and captions:
            said.insert(0, f"warning: validation prompt `{prompt}` uses {', '.join(unseen)}, which no caption of "
                           f"data.path={cfg.path} contains: the grids will not show what the run learns for "
                           f"{'them' if len(unseen) > 1 else 'it'} (put the same words in the captions, or change "
                           "validation.prompts)")
    return said
