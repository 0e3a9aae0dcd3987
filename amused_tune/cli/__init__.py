"""amused-tune: fine-tune aMUSEd from a YAML recipe, then sample from, share and merge what it learned.

commands:
  amused-tune RECIPE.yaml        train one recipe (`amused-tune RECIPE.yaml --help`: its keys, with its values)
  amused-tune RECIPE.yaml --estimate [--max-memory 6GB]   its peak GPU memory; --max-memory: make it fit
  amused-tune RECIPE.yaml --preview-data DIR              its first training images, as the model receives them
  amused-tune sample             images from a base model and adapters: text-to-image, variation, inpainting
  amused-tune recipes            the shipped recipes; `amused-tune recipes cp NAME my.yaml` copies one to edit
  amused-tune push               upload a finished run, with its model card, to the Hugging Face Hub
  amused-tune merge              fuse a run's LoRA into its base model: a full pipeline folder
  amused-tune styledrop-round2   StyleDrop round 2: sample candidates, keep the good ones, train on them
  amused-tune caption FOLDER     write a .txt caption per image with an image-to-text model (BLIP by default)
  amused-tune ui                 a local web page: start, watch, compare and share runs (pip install "amused-tune[ui]")

try it:     amused-tune recipes/quickstart.yaml               (StyleDrop from one image on the toy base, CPU, ~80 s)
your data:  amused-tune recipes cp my_folder my.yaml          (set data.path), then: amused-tune my.yaml
options:    amused-tune COMMAND --help
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from amused_tune.cli.args import SUBCOMMANDS, write_failed
from amused_tune.writes import is_write_failure


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("AMUSED_TUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns on import that an optional CPU kernel package is missing; it is not needed here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            module = importlib.import_module(SUBCOMMANDS[argv[0]])
            return module.main(argv[1:])
        from amused_tune.cli.train import train_main

        return train_main(argv, usage=__doc__)
    except OSError as err:
        if isinstance(err, BrokenPipeError):  # output piped into a command that stopped reading (`| head`): fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush stays quiet
            return 0
        if not is_write_failure(err):
            raise
        return write_failed(err, argv[0] if argv and argv[0] in SUBCOMMANDS else "train")  # every command's one line

