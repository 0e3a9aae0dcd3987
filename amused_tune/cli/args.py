"""Argument helpers shared by the commands: the recipe parser (recipe YAML + `--section.key=value` overrides, with
one-line errors naming the valid keys), the subcommands' argparse with one-line usage errors, and `fail`."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from amused_tune.cli.checks import did_you_mean, read_yaml
from amused_tune.common import kit_path
from amused_tune.data.cards import command_line_source


SUBCOMMANDS = {
    "sample": "amused_tune.cli.sample",
    "recipes": "amused_tune.cli.recipes",
    "push": "amused_tune.cli.push",
    "merge": "amused_tune.cli.merge",
    "styledrop-round2": "amused_tune.cli.styledrop_round2",
    "caption": "amused_tune.cli.caption",
    "ui": "amused_tune.ui.command",  # the web page: the layer above the commands, loaded by name (docs/layout.md)
}


class UsageError(Exception):
    """A subcommand's bad arguments; reported as one line."""


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option's line with its default, unless it has none or its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if empty or "default" in text or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".strip()


class SubcommandParser(argparse.ArgumentParser):
    """argparse for the subcommands: a usage error is one line on stderr and exit code 2, not a usage dump; --help
    shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        kwargs.setdefault("allow_abbrev", False)  # an option is named in full: --num is a mistake, not --num-images
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        unknown = re.match(r"unrecognized arguments: (--[\w-]+)", message)
        if unknown:
            flag = unknown.group(1)
            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            longer = [o for o in options if o.startswith(flag)]  # the start of an option: the one it begins
            hint = f" did you mean {longer[0]}?" if len(longer) == 1 else did_you_mean(flag, options)
            message = f"unrecognized option {flag}:{hint or ''} see {self.prog} --help"
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
        allow_abbrev=False,  # keys are exact, as in the YAML file: --train.max_s is a mistake, not max_steps
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the recipe YAML (also accepted positionally)")
    parser.add_class_arguments(Recipe, fail_untyped=True, sub_configs=True)
    from amused_tune.optimizers import described

    name = next(a for a in parser._actions if a.dest == "optim.name")  # the registry describes its optimizers
    name.help = f"The optimizer: {described()}. docs/options.md compares them."
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
                known = list(SUBCOMMANDS) + sorted(p.stem for p in recipes_dir.glob("*.yaml"))
                hint = did_you_mean(args[0], known)
                raise RecipeError(f"recipe {args[0]} not found:{hint or ''} pass a YAML file or a command "
                                  f"({', '.join(SUBCOMMANDS)}; see `amused-tune --help` and `amused-tune recipes`)")
            path = alt
        try:
            written = read_yaml(path, "recipe")
        except ValueError as err:
            raise RecipeError(str(err)) from None
        args = ["--config", str(path)] + args[1:]
        args[2:2] = earlier_values(path, written)
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except ArgumentError as err:
        raise RecipeError(_one_line(str(err))) from err
    init = parser.instantiate(ns)
    fields = {name: getattr(init, name) for name in Recipe.__dataclass_fields__}
    command_line_source(fields["data"], given_keys(args[2:] if args[:1] == ["--config"] else args, "data"))
    return Recipe(**fields).resolve().validate(), parser, ns


def earlier_values(path: Path, written: dict) -> list[str]:
    """For a recipe.yaml an earlier version of the kit wrote: the keys added since, as overrides with the values that
    do what that version did (train.identity.ADDED_KEYS), so that its run resumes as itself; [] for other files."""
    from amused_tune.train.identity import ADDED_KEYS, RESOLVED_HEADER

    if not path.read_text(encoding="utf-8").startswith(RESOLVED_HEADER):
        return []
    return [f"--{section}.{key}={json.dumps(value).strip(chr(34))}" for (section, key), value in ADDED_KEYS.items()
            if key not in (written.get(section) or {})]


def given_keys(overrides: list[str], section: str) -> set[str]:
    """The keys of `section` that command-line overrides set (`--data.path=X` or `--data.path X`)."""
    found = set()
    for arg in overrides:
        match = re.match(rf"--{section}\.(\w+)(=|$)", arg)
        if match:
            found.add(match.group(1))
    return found


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    wrong = re.match(r'Parser key "([\w.]+)":\s*Expected an? (.+?)\. Got value: (.*)$', text)
    if wrong:  # jsonargparse's type error, said in the recipe's words
        key, expected, value = wrong.groups()
        expected = _expected(expected)
        if not expected.startswith(("a ", "an ", "one of ", "true ")):
            expected = f"a {expected}"  # e.g. a tuple
        return f"{key}={value} is not valid: {key} must be {expected} (see `amused-tune RECIPE.yaml --help`)"
    union = re.match(r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes Subtypes: '
                     r"\[(.*?)\] Errors:.*Given value: (.*)$", text)
    if union:  # an optional value (X or null) given something else
        key, subtypes, value = union.groups()
        kinds = [_expected(t.strip()) for t in re.split(r",\s*(?![^\[]*\])", subtypes)]
        return (f"{key}={value} is not valid: {key} must be {' or '.join(k for k in kinds if k != 'null')} or null "
                "(see `amused-tune RECIPE.yaml --help`)")
    unknown = re.match(r"unrecognized arguments: --([\w.]+)", text)
    group = re.match(r"Group '(\w+)' does not accept option '(\w+)'", text)
    option = re.match(r"Option '([\w.]+)' is not accepted", text)
    if unknown or group or option:  # an unknown key: name it, and the keys that exist where it was put
        key = unknown.group(1) if unknown else option.group(1) if option else ".".join(group.groups())
        return _unknown_key(key)
    if "is not expected" in text or "No action for key" in text:
        text += " (see `amused-tune RECIPE.yaml --help` for the valid keys)"
    return text


def _expected(kind: str) -> str:
    """A type as jsonargparse names it (<class 'int'>, typing.Literal['a', 'b']) in the recipe's words."""
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "NoneType": "null"}
    plain = re.fullmatch(r"<class '(\w+)'>", kind)
    if plain:
        return names.get(plain.group(1), plain.group(1))
    choices = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
    return f"one of {choices.group(1)}" if choices else kind


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


# per subcommand, for a write that fails (a full disk, a read-only folder): its error prefix, its way round a folder
# it cannot write, and what rerunning it does
WRITE_ADVICE = {
    "sample": ("amused-tune sample", "pass another --out", "rerun the same command"),
    "merge": ("amused-tune", "pass another --out", "rerun the same command"),
    "caption": ("amused-tune", "copy the folder to a writable disk",
                "rerun the same command: it keeps the captions already written"),
    "push": ("amused-tune", "copy the run to a writable disk", "rerun the same command"),
    "styledrop-round2": ("amused-tune styledrop-round2", "pass another --out", "rerun the same command"),
    "recipes": ("amused-tune recipes", "pick another destination", "rerun the same command"),
    "train": ("amused-tune", "pick another output.dir",
              "rerun the same command: it resumes from the last complete checkpoint"),
}


def write_failure_line(err: BaseException, command: str = "train") -> str | None:
    """The one line a command prints for `err` when it is a failed write (a full disk, a read-only folder, no
    permission): `PROG: error: ...` with the command's advice; None for any other error. The web page shows the
    same line for its actions."""
    from amused_tune.writes import is_write_failure

    return _write_line(err, command) if is_write_failure(err) else None


def write_failed(err: OSError, command: str = "train") -> int:
    """Print a failed write (any OSError of one) as its one line on stderr; returns its exit code
    (amused_tune.writes.WRITE_FAILED)."""
    from amused_tune.writes import WRITE_FAILED

    print(_write_line(err, command), file=sys.stderr)
    return WRITE_FAILED


def _write_line(err: OSError, command: str) -> str:
    from amused_tune.writes import describe

    prog, elsewhere, rerun = WRITE_ADVICE.get(command, WRITE_ADVICE["train"])
    return f"{prog}: error: {describe(err, elsewhere, rerun)}"


def quiet_libraries() -> None:
    """Silence what the libraries print that a user cannot act on: transformers' per-model "Loading weights" bars
    and both libraries' info/warning chatter (e.g. diffusers' "modules that should be kept in float32" on every
    cast). Their errors still show; AMUSED_TUNE_LOG=INFO brings the chatter back."""
    import diffusers
    import transformers

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
