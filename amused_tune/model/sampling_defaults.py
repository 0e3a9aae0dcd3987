"""Per-base sampling defaults: the settings a base model samples best with, kept in the base's own folder.

A base folder may hold ``sampling.json`` with any subset of::

    {"guidance": 3.0, "guidance_schedule": "constant", "steps": 12, "temperature": [2.0, 0.0], "min_p": 0.1,
     "top_k": 0}

`resolve_sampling(base, guidance=None, ...)` fills every value the caller did not give (None) from that file, then
from diffusers' defaults (guidance 10, constant schedule, 12 steps, temperature 2 -> 0, no truncation: min_p 0
and top_k 0, see `amused_tune.sampling.sampler`), and says which values came from the base. `amused-tune sample`, the validation grids of a run and its model card all resolve this way, so one
base's recommended settings reach all three. The file is looked up in a local pipeline folder, in the toy base's
folder, and for a Hub id in the Hugging Face cache only (nothing is downloaded for it). Torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from amused_tune.common import GUIDANCE_SCHEDULES

SAMPLING_FILE = "sampling.json"
DIFFUSERS_DEFAULTS = {"guidance": 10.0, "guidance_schedule": "constant", "steps": 12, "temperature": (2.0, 0.0),
                      "min_p": 0.0, "top_k": 0}


class SamplingDefaultsError(ValueError):
    """A sampling.json that cannot be used; the message names the file and the key."""


def sampling_file(base: str) -> Path | None:
    """Where `base`'s sampling.json would be (None for `tiny`, or a Hub id without the file in the cache)."""
    if base == "tiny":
        return None
    if base == "toy":
        from amused_tune.common import TOY_WEIGHTS_DIR

        return TOY_WEIGHTS_DIR / SAMPLING_FILE
    path = Path(base).expanduser()
    if path.is_dir():
        return path / SAMPLING_FILE
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base, SAMPLING_FILE)  # a path, None, or a "known missing" marker
    except ValueError:  # not a valid repository id: the model loader says so
        return None
    return Path(cached) if isinstance(cached, str) else None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(key: str, value: object) -> object:
    """The value as the sampler takes it, or None when it is not valid for `key`."""
    if key == "guidance" and _number(value) and value >= 0:
        return float(value)
    if key == "guidance_schedule" and value in GUIDANCE_SCHEDULES:
        return value
    if key == "steps" and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if key == "min_p" and _number(value) and 0 <= value < 1:
        return float(value)
    if key == "top_k" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if key == "temperature":
        if _number(value):
            return float(value)
        if isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value):
            return (float(value[0]), float(value[1]))
    return None


EXPECTED = {"guidance": "a number >= 0", "guidance_schedule": f"one of {', '.join(GUIDANCE_SCHEDULES)}",
            "steps": "an integer >= 1", "temperature": "a number or [start, end]",
            "min_p": "a number in [0, 1) (0: off)", "top_k": "an integer >= 0 (0: off)"}


def read_sampling_file(path: Path) -> dict:
    """The validated contents of one sampling.json; raises SamplingDefaultsError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SamplingDefaultsError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise SamplingDefaultsError(f"{path}: must hold a JSON object such as {{\"guidance\": 3.0, \"steps\": 12}}")
    values = {}
    for key, value in data.items():
        if key not in DIFFUSERS_DEFAULTS:
            raise SamplingDefaultsError(f"{path}: unknown key {key!r}; valid keys: {', '.join(DIFFUSERS_DEFAULTS)}")
        values[key] = _check(key, value)
        if values[key] is None:
            raise SamplingDefaultsError(f"{path}: {key} must be {EXPECTED[key]}, got {json.dumps(value)}")
    return values


def sampling_defaults(base: str) -> dict:
    """The sampling settings `base` recommends ({} when its folder holds no sampling.json)."""
    path = sampling_file(base)
    return read_sampling_file(path) if path is not None and path.is_file() else {}


def resolve_sampling(base: str, **given: object) -> tuple[dict, dict]:
    """(values, taken_from_base): every key of DIFFUSERS_DEFAULTS, the caller's value where it is not None, else
    the base's sampling.json, else diffusers' default. `given` keys must be keys of DIFFUSERS_DEFAULTS."""
    unknown = set(given) - set(DIFFUSERS_DEFAULTS)
    if unknown:
        raise TypeError(f"resolve_sampling: unknown settings {sorted(unknown)}")
    from_base = sampling_defaults(base)
    values, taken = {}, {}
    for key, default in DIFFUSERS_DEFAULTS.items():
        if given.get(key) is not None:
            values[key] = given[key]
        elif key in from_base:
            values[key] = taken[key] = from_base[key]
        else:
            values[key] = default
    return values, taken


def describe_taken(base: str, taken: dict) -> str | None:
    """'sampling defaults from BASE: guidance 3.0, steps 12', or None when nothing came from the base."""
    if not taken:
        return None
    shown = [f"{k} {' '.join(str(v) for v in val) if isinstance(val, tuple) else val}" for k, val in taken.items()]
    return f"sampling defaults from {base}: {', '.join(shown)}"
