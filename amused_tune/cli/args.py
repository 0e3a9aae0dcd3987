"""Argument helpers shared by the commands: the recipe parser (recipe YAML + `--section.key=value` overrides, with
one-line errors naming the valid keys), the subcommands' argparse with one-line usage errors, and `fail`."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from amused_tune.common import kit_path


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
            recipes_dir = kit_path("recipes")
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


def fail(err, prog: str = "amused-tune") -> int:
    """Print a user's mistake as one line on stderr; returns exit code 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
