"""`amused-tune RECIPE.yaml [--section.key=value ...] [--print_config]`: train one recipe."""

from __future__ import annotations

import os
import sys

from amused_tune.cli.args import build_parser, fail, parse_recipe, write_failed


def train_main(argv: list[str], usage: str = "") -> int:
    """`amused-tune RECIPE.yaml ...`; `usage` (the command overview) is printed for a bare `amused-tune`."""
    from amused_tune.recipe import RecipeError

    if not argv or argv[0] in ("-h", "--help"):
        print(usage.strip())
        print("\nrecipe keys, with the schema's defaults (`amused-tune RECIPE.yaml --help` shows a recipe's values):\n")
        build_parser().print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        return recipe_help([a for a in argv if a not in ("-h", "--help")])
    from amused_tune.cli.estimate import apply as apply_memory_options, split_memory_args

    argv, memory_options = split_memory_args(argv)  # --estimate, --max-memory SIZE (docs/memory.md)
    from amused_tune.cli import preview_data

    argv, preview_dir = preview_data.split_preview_arg(argv)  # --preview-data DIR: the training images, then exit
    if "--print_config" in argv:
        return print_config([a for a in argv if a != "--print_config"])
    try:
        recipe, _, _ = parse_recipe(argv)
    except RecipeError as err:
        return fail(err)
    if preview_dir is not None:
        return preview_data.main(recipe, preview_dir)
    recipe, code = apply_memory_options(recipe, memory_options)
    if code is not None:
        return code
    return run_training(recipe)


def print_config(argv: list[str]) -> int:
    """`--print_config`: the resolved recipe, with what the dataset card fills in (not nulls)."""
    from amused_tune.data.cards import DataError, resolve_config
    from amused_tune.recipe import RecipeError
    from amused_tune.train.identity import recipe_yaml

    try:
        recipe, _, _ = parse_recipe(argv)
        recipe.data = resolve_config(recipe.data)
    except (RecipeError, DataError) as err:
        return fail(err)
    print(recipe_yaml(recipe), end="")
    return 0


def run_training(recipe) -> int:
    """Train a parsed recipe; every way a run can end becomes an exit code and at most one line on stderr."""
    from amused_tune.model.adapters import AdapterError
    from amused_tune.cli.args import quiet_libraries
    from amused_tune.data.cards import DataError
    from amused_tune.data.preflight import preflight, validation_prompts
    from amused_tune.model.bases import BaseModelError
    from amused_tune.recipe import RecipeError
    from amused_tune.model.sampling_defaults import SamplingDefaultsError
    from amused_tune.train.loop import TrainingStopped, train

    try:  # the data resolved and listed once, before a model loads (a typo in data.path is said here)
        plan = preflight(recipe.data)
    except (DataError, OSError) as err:
        return fail(err)
    problem = paths_problem(recipe)
    if problem:  # a typo in model.base, train.resume or prior.prompts: said before a model loads
        return fail(problem)
    recipe.validation.prompts, said = validation_prompts(plan, recipe.validation)  # validation.from_data
    for line in said:  # the prompts taken from the captions; words of the prompts no caption has
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    quiet_libraries()
    try:
        if recipe.styledrop.rounds > 1:  # StyleDrop's feedback rounds (amused_tune/styledrop/rounds.py)
            from amused_tune.cli.styledrop_round2 import recipe_picker
            from amused_tune.styledrop.rounds import run_rounds

            summary = run_rounds(recipe, recipe_picker)
        else:
            summary = train(recipe, data=plan)
    except TrainingStopped as err:
        if os.environ.get("RANK", "0") == "0":  # every process stops alike: say it once
            print(f"amused-tune: {'error: ' if err.error else ''}{err}", file=sys.stderr)
        return err.exit_code
    except (RecipeError, DataError, BaseModelError, AdapterError, SamplingDefaultsError) as err:
        return fail(err)
    except KeyboardInterrupt:
        print(f"amused-tune: interrupted; the last complete checkpoint in {recipe.output.dir}/checkpoints is intact",
              file=sys.stderr)
        return 130
    except OSError as err:  # a write failed: a full disk, a read-only folder (the last complete checkpoint is intact)
        if err.filename is None:
            err.filename = recipe.output.dir
        return write_failed(err, "train")
    if summary.get("already_done") or os.environ.get("RANK", "0") != "0":  # (the main process reports)
        return 0
    if summary.get("push_error"):  # the run is complete and saved; the push's one-line reason is already printed
        return 2
    from amused_tune.train.report import finished

    finished(summary)
    return 0


def paths_problem(recipe) -> str | None:
    """A model.base folder, a train.resume path or a prior.prompts file that does not exist (one line), or None."""
    from pathlib import Path

    from amused_tune.data.prior import prior_prompts
    from amused_tune.model.bases import missing_base
    from amused_tune.recipe import RecipeError

    if missing_base(recipe.model.base):
        return missing_base(recipe.model.base)
    where = recipe.train.resume
    if where not in ("auto", "none") and not Path(where).expanduser().exists():
        return (f"train.resume={where} does not exist, so there is no readable checkpoint there: pass a "
                "checkpoints/step-N folder or an output dir that holds one, or train.resume=auto")
    try:
        prior_prompts(recipe.prior.prompts)
    except RecipeError as err:
        return str(err)
    return None


def recipe_help(argv: list[str]) -> int:
    """`amused-tune RECIPE.yaml [overrides] --help`: every key's help, with this recipe's values as the defaults."""
    from amused_tune.recipe import RecipeError

    try:
        recipe, parser, _ = parse_recipe(argv)
    except RecipeError as err:
        return fail(err)
    parser.set_defaults({f"{section}.{key}": value for section, values in recipe.to_dict().items()
                         for key, value in values.items()})
    parser.print_help()
    return 0
