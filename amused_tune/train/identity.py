"""A run's identity: the fingerprint of what defines it, and the resolved recipe.yaml that records it.

A run resumed with a changed recipe is refused unless only keys in `RESUMABLE_CHANGES` differ.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

import yaml

from amused_tune.recipe import Recipe

# keys that may change between a run and its resumption without making it a different run
# (the run's length, its logging and outputs, and how it executes; precision and skip_nonfinite are the remedies a
# stopped run may need to continue)
RESUMABLE_CHANGES = {
    ("train", "max_steps"), ("train", "resume"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
    ("train", "log_every"), ("train", "device"), ("train", "skip_nonfinite"), ("train", "precision"),
    ("train", "grad_checkpointing"), ("train", "compile"), ("data", "num_workers"), ("data", "cache_dir"),
    ("validation", None), ("output", None),
}
# keys added after run folders were first written, each with the value that does what the versions before it did:
# a recipe.yaml the kit wrote without the key is read with that value (cli.args.parse_recipe), and the key at that
# value is left out of the fingerprint, so an earlier run still resumes as itself
ADDED_KEYS = {("data", "pixel_art"): False, ("data", "background"): "#ffffff", ("data", "colour_variants"): 0,
              ("data", "colours"): None}
# sections added since, likewise: at their defaults (what earlier versions did) they leave the fingerprint unchanged
ADDED_SECTIONS = ("styledrop",)
RESOLVED_HEADER = "# resolved recipe written by amused-tune"
VERSIONED = ("amused-tune", "torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of everything that defines the run (not its length, logging or outputs)."""
    d = recipe.to_dict()
    for section, key in RESUMABLE_CHANGES:
        if key is None:
            d.pop(section, None)
        else:
            d[section].pop(key, None)
    for (section, key), earlier in ADDED_KEYS.items():
        if d[section].get(key) == earlier:
            d[section].pop(key)
    for section in ADDED_SECTIONS:
        if d.get(section) == Recipe().to_dict()[section]:
            d.pop(section)
    if recipe.validation.holdout:  # held-out images are not trained on: a different holdout is a different run
        d["holdout"] = recipe.validation.holdout
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def recipe_yaml(recipe: Recipe) -> str:
    header = f"{RESOLVED_HEADER}; resume or rerun with: amused-tune THIS_FILE\n"
    header += "".join(f"# {k}=={v}\n" for k, v in package_versions().items())
    header += f"# fingerprint: {recipe_fingerprint(recipe)}\n"
    return header + yaml.safe_dump(json.loads(json.dumps(recipe.to_dict())), sort_keys=False)
