"""Helpers for tests that measure learning on the toy world (`amused_tune.toy`).

    from toyworld_helpers import classify, caption_match_rate, toy_components

`classify(image)` names the shape, colour, background and style of a 32x32 toy-world image exactly (PIL image,
HxWx3 array or a [3, H, W] tensor in [0, 1]); `caption_match_rate(images, captions)` is the fraction of images that
show what their caption asks for; `is_clean(image)` / `clean_rate(images)` whether / how many samples hold no stray
cell (each is cell for cell the rendering of what was read). `toy_components()` loads the shipped toy base once per test session (copies are
cheap: use `fresh_toy()` before training, since training changes the weights in place).
"""

from __future__ import annotations

import copy
from functools import lru_cache

from amused_tune.toy import world
from amused_tune.toy.classify import Classification, classify, is_clean
from amused_tune.toy.evaluate import clean_rate, eval_prompts, match_rate
from amused_tune.toy.world import ShapeSpec, caption, parse_caption, render

__all__ = [
    "Classification", "ShapeSpec", "caption", "classify", "clean_rate", "eval_prompts",
    "fresh_toy", "is_clean", "match_rate", "parse_caption", "render", "toy_components", "world",
]


@lru_cache(maxsize=1)
def toy_components():
    """The shipped toy base (read-only by convention: do not train it, use `fresh_toy()`)."""
    from amused_tune.model.bases import load_components

    return load_components("toy")


def fresh_toy():
    """A private deep copy of the toy base, safe to fine-tune."""
    return copy.deepcopy(toy_components())
