"""Command line: `amused-tune RECIPE.yaml [--section.key=value ...]` trains; subcommands do the rest.

  amused-tune RECIPE.yaml [--train.max_steps=10] [--print_config]   train one recipe
  amused-tune RECIPE.yaml --estimate [--max-memory 6GB]             its peak GPU memory (--max-memory: make it fit)
  amused-tune sample ...                                            text-to-image, variation, inpainting
  amused-tune recipes [--json] | recipes cp NAME DEST.yaml          the shipped recipes
  amused-tune push OUTPUT_DIR --repo-id user/name                   upload an adapter with its model card
  amused-tune merge OUTPUT_DIR --out DIR                            fuse a LoRA into a full pipeline folder
  amused-tune styledrop-round2 RUN --prompts prompts.txt            StyleDrop round 2 candidates
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

SUBCOMMANDS = {
    "sample": "amused_tune.cli.sample",
    "recipes": "amused_tune.cli.recipes",
    "push": "amused_tune.cli.push",
    "merge": "amused_tune.cli.merge",
    "styledrop-round2": "amused_tune.cli.styledrop_round2",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("AMUSED_TUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns on import that an optional CPU kernel package is missing; it is not needed here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return module.main(argv[1:])
    from amused_tune.cli.train import train_main

    return train_main(argv)

