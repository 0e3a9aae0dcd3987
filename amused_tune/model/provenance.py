"""What trained weights record about where they came from: the base they were trained on and the sampling settings
their validation grids used, so that sampling, merging and sharing them needs no `--base` and no settings.

Every run writes ``amused_tune.json`` beside its final weights (``adapter/`` for LoRA, ``transformer/`` for full
fine-tuning), and the LoRA file keeps the same record in its safetensors metadata (key ``amused_tune``), so that a
lone ``.safetensors`` file, a pushed repo and a downloaded folder all carry it::

    {"base": "toy", "revision": null, "base_path": null,
     "sampling": {"guidance": 2.0, "guidance_schedule": "constant", "steps": 12, "temperature": [2.0, 0.0]}}

``revision`` is the Hub commit of a Hub base when its snapshot is in the local cache; ``base_path`` the absolute
path of a local base folder (``base`` keeps the path as the recipe wrote it). Older adapters without the record
fall back to peft's ``base_model_name_or_path`` and then to the run's recipe.yaml (base only, no settings).
Torch-free for local weights: the safetensors header is read without loading any tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from amused_tune.common import DIFFUSERS_FILE, PEFT_CONFIG, RECIPE_FILE
from amused_tune.model.sampling_defaults import DIFFUSERS_DEFAULTS, SAMPLING_FILE, SamplingDefaultsError, resolve_sampling

INFO_FILE = "amused_tune.json"
METADATA_KEY = "amused_tune"


def hub_revision(base: str) -> str | None:
    """The commit of a Hub base's snapshot in the local cache (nothing is downloaded), else None."""
    if base in ("tiny", "toy") or base.startswith((".", "/", "~")) or base.count("/") != 1 or Path(base).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base, "model_index.json")
    except ValueError:
        return None
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def run_record(base: str, validation=None, pixel_art: dict | None = None) -> dict:
    """The record a run writes: its base, the sampling settings of its validation (the recipe's validation
    values where set, else the base's sampling.json, else diffusers' defaults) and its pixel-art settings
    (grid, palette and its colours, transparency: amused_tune.sampling.pixel_art), if any."""
    given = {k: getattr(validation, k, None) for k in DIFFUSERS_DEFAULTS} if validation is not None else {}
    try:
        sampling, _ = resolve_sampling(base, **given)
    except SamplingDefaultsError:  # a broken sampling.json is reported where it is used, not here
        sampling = None
    path = Path(base).expanduser()
    return {"base": base, "revision": hub_revision(base),
            "base_path": str(path.resolve()) if base not in ("tiny", "toy") and path.is_dir() else None,
            "sampling": None if sampling is None else {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in sampling.items()},
            "pixel_art": pixel_art}


def write_record(folder: str | os.PathLike, record: dict) -> Path:
    path = Path(folder) / INFO_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _from_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("base") else None


def _from_safetensors(path: Path) -> dict | None:
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged file is reported by the loader, with its own message
        return None
    try:
        data = json.loads(meta.get(METADATA_KEY, "null"))
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("base") else None


def _from_peft_or_recipe(folder: Path) -> dict | None:
    """The base alone, from peft's adapter_config.json or the run's recipe.yaml (adapters written before the record)."""
    try:
        base = json.loads((folder / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    for recipe in (folder / RECIPE_FILE, folder.parent / RECIPE_FILE):
        if not base and recipe.is_file():
            import yaml

            try:
                base = ((yaml.safe_load(recipe.read_text()) or {}).get("model") or {}).get("base")
            except (yaml.YAMLError, AttributeError):
                base = None
    return {"base": str(base), "revision": None, "base_path": None, "sampling": None} if base else None


def read_record(source: str | os.PathLike) -> dict | None:
    """The record of a run folder, an adapter or transformer folder, a weights file or a Hub adapter id; None when
    nothing says which base it was trained on."""
    path = Path(source).expanduser()
    if path.is_file():
        return _from_json(path.parent / INFO_FILE) or _from_safetensors(path) or _from_peft_or_recipe(path.parent)
    if path.is_dir():
        for folder in (path / "adapter", path / "transformer", path):
            found = _from_json(folder / INFO_FILE) or _from_safetensors(folder / DIFFUSERS_FILE)
            if found:
                return found
        return _from_peft_or_recipe(path / "adapter" if (path / "adapter").is_dir() else path)
    return _from_hub(str(source))


def _from_hub(repo_id: str) -> dict | None:
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download

    from amused_tune.model.bases import hub_unreachable

    if hub_unreachable():  # the adapter loader says so in one line; no ~30 s of retries here first
        return None
    for name in (INFO_FILE, DIFFUSERS_FILE):
        try:
            local = Path(hf_hub_download(repo_id, name))
        except Exception:  # noqa: BLE001 - not there, offline: the adapter loader says what is wrong
            continue
        found = _from_json(local) if name == INFO_FILE else _from_safetensors(local)
        if found:
            return found
    return None


def loadable_base(record: dict) -> str:
    """The base to load for a record: as the recipe named it, or its absolute path when that name was relative to
    a folder the command no longer runs in."""
    base, absolute = str(record["base"]), record.get("base_path")
    if absolute and not Path(base).expanduser().is_dir() and Path(absolute).is_dir():
        return absolute
    return base


def same_base(a: str, b: str) -> bool:
    """Whether two base names mean the same model (a folder named by two different paths counts as one)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def mismatch_warning(source, record: dict | None, base: str) -> str | None:
    """The warning for weights used on another base than the one they recorded; None when it is that base, or when
    `base` names a folder that does not exist (the loader's error says so on its own)."""
    if not record or same_base(base, record["base"]) or same_base(base, loadable_base(record)):
        return None
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
        return None
    return f"warning: {source} was trained on {record['base']}, not on {base} (--base): it may draw differently, or not load"


def recorded_sampling(record: dict | None) -> dict:
    """The record's sampling settings as the sampler takes them ({} when it has none)."""
    values = dict((record or {}).get("sampling") or {})
    if isinstance(values.get("temperature"), list):
        values["temperature"] = tuple(values["temperature"])
    return {k: v for k, v in values.items() if k in DIFFUSERS_DEFAULTS and v is not None}


def merged_sampling_file(folder: str | os.PathLike, base_defaults: dict, record: dict | None) -> Path | None:
    """Write a merged pipeline's sampling.json: the base's own settings, with the adapter's recorded ones over them.
    None (no file) when neither has any."""
    values = {**base_defaults, **recorded_sampling(record)}
    if not values:
        return None
    path = Path(folder) / SAMPLING_FILE
    path.write_text(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}, indent=2)
                    + "\n")
    return path
