"""Helpers shared by the test modules (fixtures stay in conftest.py): import them from here, never from another
test module."""

from __future__ import annotations


def pixel_dataset(data, resolution: int):
    """The pixel dataset of a data section (its card resolved), every sample validated first (cache off)."""
    from amused_tune.data.cards import resolve_config
    from amused_tune.data.datasets import validated_dataset

    return validated_dataset(resolve_config(data), resolution)[0]
