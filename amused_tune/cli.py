"""Command line: `amused-tune RECIPE.yaml [--section.key=value ...]` trains; subcommands do the rest.

  amused-tune RECIPE.yaml [--train.max_steps=10] [--print_config]   train one recipe
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
from pathlib import Path

SUBCOMMANDS = {
    "sample": "amused_tune.sample_cli",
    "recipes": "amused_tune.recipes_cli",
    "push": "amused_tune.hub",
    "merge": "amused_tune.merge",
    "styledrop-round2": "amused_tune.styledrop",
}


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from amused_tune.recipe import Recipe

    parser = ArgumentParser(
        prog="amused-tune",
        description="Fine-tune aMUSEd from a YAML recipe. Every recipe key can be overridden: --train.max_steps=10",
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the recipe YAML (also accepted positionally)")
    parser.add_class_arguments(Recipe, fail_untyped=True, sub_configs=True)
    return parser


def parse_recipe(argv: list[str]):
    """argv (recipe path first, then overrides) -> a validated Recipe; raises ValueError with a one-line reason."""
    from jsonargparse import ArgumentError

    from amused_tune.recipe import Recipe, RecipeError

    args = list(argv)
    if args and not args[0].startswith("-"):
        path = Path(args[0])
        if not path.is_file():
            recipes_dir = Path(__file__).resolve().parent.parent / "recipes"
            alt = recipes_dir / (args[0] if args[0].endswith(".yaml") else args[0] + ".yaml")
            if not alt.is_file():
                raise RecipeError(f"recipe {args[0]} not found: pass a YAML file (see `amused-tune recipes`)")
            path = alt
        args = ["--config", str(path)] + args[1:]
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except ArgumentError as err:
        raise RecipeError(_one_line(str(err))) from err
    init = parser.instantiate(ns)
    fields = {name: getattr(init, name) for name in Recipe.__dataclass_fields__}
    return Recipe(**fields).validate(), parser, ns


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    if "unrecognized arguments" in text or "is not expected" in text or "No action for key" in text:
        text += " (see `amused-tune RECIPE.yaml --help` for the valid keys)"
    return text


def train_main(argv: list[str]) -> int:
    from amused_tune.recipe import RecipeError

    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        print(__doc__)
        return 0
    if "--print_config" in argv:
        argv = [a for a in argv if a != "--print_config"]
        try:
            recipe, parser, ns = parse_recipe(argv)
        except RecipeError as err:
            return _fail(err)
        from amused_tune.outputs import recipe_yaml

        print(recipe_yaml(recipe), end="")
        return 0
    try:
        recipe, _, _ = parse_recipe(argv)
    except RecipeError as err:
        return _fail(err)

    from amused_tune.data import DataError
    from amused_tune.models import BaseModelError
    from amused_tune.adapters import AdapterError
    from amused_tune.trainer import TrainingStopped, train

    try:
        summary = train(recipe)
    except TrainingStopped as err:
        print(f"amused-tune: {err}", file=sys.stderr)
        return err.exit_code
    except (RecipeError, DataError, BaseModelError, AdapterError) as err:
        return _fail(err)
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            return _fail(f"disk full while writing {err.filename or recipe.output.dir}: free space and rerun "
                         "the same command to resume from the last complete checkpoint")
        raise
    if summary.get("already_done"):
        return 0
    print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, outputs in {summary['output_dir']}")
    return 0


def _fail(err) -> int:
    print(f"amused-tune: error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("AMUSED_TUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return module.main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
