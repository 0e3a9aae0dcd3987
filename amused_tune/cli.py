"""Command line: `amused-tune RECIPE.yaml [--section.key=value ...]` trains; subcommands do the rest.

  amused-tune RECIPE.yaml [--train.max_steps=10] [--print_config]   train one recipe
  amused-tune sample ...                                            text-to-image, variation, inpainting
  amused-tune recipes [--json] | recipes cp NAME DEST.yaml          the shipped recipes
  amused-tune push OUTPUT_DIR --repo-id user/name                   upload an adapter with its model card
  amused-tune merge OUTPUT_DIR --out DIR                            fuse a LoRA into a full pipeline folder
  amused-tune styledrop-round2 RUN --prompts prompts.txt            StyleDrop round 2 candidates
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path

class UsageError(Exception):
    """A subcommand's bad arguments; reported as one line."""


class SubcommandParser(argparse.ArgumentParser):
    """argparse for the subcommands: a usage error is one line on stderr and exit code 2, not a usage dump."""

    def error(self, message: str) -> None:
        raise UsageError(message)

    def parse_or_exit_code(self, argv: list[str]) -> tuple[argparse.Namespace | None, int]:
        """(args, 0), or (None, exit code) once the error or the --help text is printed."""
        try:
            return self.parse_args(argv), 0
        except UsageError as err:
            print(f"{self.prog}: error: {err}", file=sys.stderr)
            return None, 2
        except SystemExit as exit_:  # --help
            return None, int(exit_.code or 0)


SUBCOMMANDS = {
    "sample": "amused_tune.sample_cli",
    "recipes": "amused_tune.recipes_cli",
    "push": "amused_tune.hub",
    "merge": "amused_tune.merge",
    "styledrop-round2": "amused_tune.styledrop",
}


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become the --help text

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
    wrong = re.match(r'Parser key "([\w.]+)":\s*Expected an? (.+?)\. Got value: (.*)$', text)
    if wrong:  # jsonargparse's type error, said in the recipe's words
        key, expected, value = wrong.groups()
        names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
        expected = re.sub(r"<class '(\w+)'>", lambda m: names.get(m.group(1), m.group(1)), expected)
        choices = re.match(r"typing\.Literal\[(.*)\]$", expected)
        expected = f"one of {choices.group(1)}" if choices else (
            expected if expected in names.values() else f"a {expected}")
        return f"{key}={value} is not valid: {key} must be {expected} (see `amused-tune RECIPE.yaml --help`)"
    unknown = re.match(r"unrecognized arguments: --([\w.]+)", text)
    group = re.match(r"Group '(\w+)' does not accept option '(\w+)'", text)
    option = re.match(r"Option '([\w.]+)' is not accepted", text)
    if unknown or group or option:  # an unknown key: name it, and the keys that exist where it was put
        key = unknown.group(1) if unknown else option.group(1) if option else ".".join(group.groups())
        return _unknown_key(key)
    if "is not expected" in text or "No action for key" in text:
        text += " (see `amused-tune RECIPE.yaml --help` for the valid keys)"
    return text


def _unknown_key(key: str) -> str:
    import difflib
    from dataclasses import fields

    from amused_tune.recipe import Recipe

    sections = {f.name: f.default_factory() for f in fields(Recipe)}
    section, _, name = key.partition(".")
    if section in sections and name:
        valid = [f.name for f in fields(sections[section])]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {section}.{close[0]}? " if close else ""
        return (f"{key} is not a recipe key: {hint}{section} takes {', '.join(valid)} "
                "(`amused-tune RECIPE.yaml --help` explains each)")
    close = difflib.get_close_matches(section, list(sections), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key} is not a recipe key: {hint}the sections are {', '.join(sections)} (see `amused-tune RECIPE.yaml --help`)"


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
        from amused_tune.cards import DataError, resolve_config
        from amused_tune.outputs import recipe_yaml

        try:  # show what the dataset card fills in, not nulls
            recipe.data = resolve_config(recipe.data)
        except DataError as err:
            return _fail(err)
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
        if os.environ.get("RANK", "0") == "0":  # every process stops alike: say it once
            print(f"amused-tune: {'error: ' if err.error else ''}{err}", file=sys.stderr)
        return err.exit_code
    except (RecipeError, DataError, BaseModelError, AdapterError) as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"amused-tune: interrupted; the last complete checkpoint in {recipe.output.dir}/checkpoints is intact",
              file=sys.stderr)
        return 130
    except OSError as err:
        where = err.filename or recipe.output.dir
        if err.errno == errno.ENOSPC:
            return _fail(f"disk full while writing {where}: free space and rerun the same command to resume from "
                         "the last complete checkpoint")
        return _fail(f"{err.strerror or err}: {where} (output.dir={recipe.output.dir}); the last complete "
                     "checkpoint is intact: fix this and rerun the same command to resume")
    if summary.get("already_done") or os.environ.get("RANK", "0") != "0":  # (the main process reports)
        return 0
    if summary.get("push_error"):  # the run is complete and saved; the push's one-line reason is already printed
        return 2
    print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, outputs in {summary['output_dir']}")
    return 0


def _fail(err) -> int:
    print(f"amused-tune: error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("AMUSED_TUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns on import that an optional CPU kernel package is missing; it is not needed here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return module.main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
