"""Dataset cards: one YAML per dataset in datasets_cards/, merged under a recipe's data section.

A card names where the data lives (source, path or Hub id, split), its columns, the prompt prefix/template and its
licence; a recipe names a card (`data.card: nouns`) or a path and overrides any of its fields. Torch-free, so the
model card writer can read cards without loading models.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from amused_tune.common import kit_path, yaml_error_words
from amused_tune.data.augment import vocabulary
from amused_tune.data.pixel_art import parse_colour
from amused_tune.recipe import DataConfig, SourceConfig

CARD_DEFAULTS = {"split": "train", "image_column": "image", "caption_column": "text", "prompt_prefix": "",
                 "prompt_template": "{caption}", "center_crop": True, "random_flip": False, "pixel_art": "auto"}
CARD_INFO_KEYS = {"name", "description", "licence", "license", "homepage", "resolution", "recipes"}


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file or key to fix."""


def cards_dir() -> Path:
    """The folder of dataset cards: $AMUSED_TUNE_CARDS, else the kit's datasets_cards/."""
    folder = Path(os.environ.get("AMUSED_TUNE_CARDS") or kit_path("datasets_cards"))
    if not folder.is_dir():
        raise DataError(f"dataset cards folder {folder} not found: set AMUSED_TUNE_CARDS to the kit's "
                        "datasets_cards/ folder, or pass data.card=path/to/card.yaml")
    return folder


def card_path(card: str) -> Path:
    """datasets_cards/NAME.yaml for a bare name, else the path itself."""
    if card.endswith((".yaml", ".yml")) or "/" in card:
        return Path(card).expanduser()
    return cards_dir() / f"{card}.yaml"


def load_card(card: str) -> dict:
    """A card by name (datasets_cards/NAME.yaml) or path; unknown keys are an error naming the valid ones."""
    path = card_path(card)
    if not (card.endswith((".yaml", ".yml")) or "/" in card):
        if not path.is_file():
            names = sorted(p.stem for p in cards_dir().glob("*.yaml"))
            raise DataError(f"data.card={card}: no such card; available: {', '.join(names)} (or a path to a YAML)")
    elif not path.is_file():
        raise DataError(f"data.card={card}: file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DataError(f"data.card={card}: {path} is not valid YAML{yaml_error_words(err)}") from None
    settable = {f.name for f in dataclasses.fields(DataConfig) if f.default is None and f.name != "card"}
    unknown = sorted(set(values) - settable - CARD_INFO_KEYS)
    if unknown:
        raise DataError(f"data.card={path}: unknown key(s) {', '.join(unknown)}; a card may set "
                        f"{', '.join(sorted(settable | CARD_INFO_KEYS))}")
    return values


def resolve_config(cfg: DataConfig) -> DataConfig:
    """The data section with the card's values and the defaults filled in where the recipe left keys unset. With
    `data.sources` the section is returned as it is: each source is resolved on its own (data.mixture)."""
    if cfg.sources:
        return cfg
    card = load_card(cfg.card) if cfg.card else {}
    values = {}
    for f in dataclasses.fields(DataConfig):
        value = getattr(cfg, f.name)
        if value is None:
            value = card.get(f.name, CARD_DEFAULTS.get(f.name))
        values[f.name] = value
    out = DataConfig(**values)
    where = f" (card {cfg.card})" if cfg.card else ""
    if out.source is None or out.path is None:
        raise DataError(f"data: set data.card, or data.source and data.path{where}")
    if out.random_crops < 1:
        raise DataError(f"data.random_crops must be >= 1, got {out.random_crops}")
    if out.colour_variants < 0:
        raise DataError(f"data.colour_variants must be >= 0 (0: no recoloured copies), got {out.colour_variants}")
    if out.colour_variants:
        try:
            vocabulary(out.colours)
        except ValueError as err:
            raise DataError(str(err)) from None
    if out.min_image_size is not None and out.min_image_size < 0:
        raise DataError(f"data.min_image_size must be >= 0, got {out.min_image_size}")
    if out.pixel_art not in ("auto", True, False):
        raise DataError(f"data.pixel_art={out.pixel_art!r}{where}: give auto, true or false")
    try:
        parse_colour(out.background)
    except ValueError as err:
        raise DataError(f"{err}{where}") from None
    return out


# The keys that say what the data is and how its captions read, from one list (SourceConfig's fields): an entry of
# data.sources sets OWN_KEYS for itself (every other data key is the data section's); a card or a source given on the
# command line replaces SOURCE_KEYS, the same keys but the trigger word (it names the concept, not the data).
OWN_KEYS = tuple(f.name for f in dataclasses.fields(SourceConfig) if f.name != "repeats")
SOURCE_KEYS = tuple(key for key in OWN_KEYS if key != "trigger_word")


def command_line_source(cfg: DataConfig, given: set[str]) -> DataConfig:
    """The rule for pointing a recipe at other data: when the command line gives `data.card` or `data.source`, the
    recipe file's SOURCE_KEYS that the command line does not give are unset (their values then come from the card,
    else the defaults), so a single-image recipe's `prompt` never silently replaces a folder's own captions.
    `given` is the data keys set on the command line. Without a card or source there, nothing changes."""
    if not given & {"card", "source"}:
        return cfg
    for key in SOURCE_KEYS:
        if key not in given:
            setattr(cfg, key, None)
    return cfg
