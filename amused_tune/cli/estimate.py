"""`amused-tune RECIPE.yaml --estimate [--max-memory SIZE]`: the predicted peak GPU memory of a recipe.

`--estimate` prints what the GPU will hold (docs/memory.md) and exits: no weights are loaded, nothing is
downloaded. `--max-memory 6GB` turns on the kit's memory levers in order until the prediction fits in 6 GB and
prints each change; with `--estimate` it then prints the breakdown, without it the run trains with those changes.
"""

from __future__ import annotations

import sys

def split_memory_args(argv: list[str]) -> tuple[list[str], dict]:
    """(argv without the memory flags, {"estimate": bool, "max_memory": SIZE or None})."""
    rest, options, i = [], {"estimate": False, "max_memory": None}, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--estimate":
            options["estimate"] = True
        elif arg.startswith("--max-memory="):
            options["max_memory"] = arg.split("=", 1)[1]
        elif arg == "--max-memory":
            options["max_memory"] = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, options


def apply(recipe, options: dict):
    """(recipe to train, exit code or None): --max-memory's changes, then --estimate's breakdown and exit 0.
    A user's mistake (a bad size, a recipe that cannot fit, a CPU-sized base) is a one-line error, exit 2."""
    if not options["estimate"] and options["max_memory"] is None:
        return recipe, None
    from amused_tune.memory import estimate as memory
    from amused_tune.memory import fit as memory_fit
    from amused_tune.cli.args import fail

    try:
        if options["max_memory"] is not None:
            budget = memory_fit.parse_size(options["max_memory"])
            recipe = memory_fit.fit(recipe, budget, say=lambda line: print(line, file=sys.stderr))
        if options["estimate"]:
            est = memory.estimate(recipe)
            t = recipe.train
            print(f"{recipe.model.base}, {recipe.adapter.kind}, batch {t.batch_size} x {t.grad_accum} accumulation, "
                  f"{t.precision} autocast, frozen weights {recipe.model.dtype}, cache "
                  f"{'on' if recipe.data.cache else 'off'}, 8-bit Adam {'on' if recipe.optim.adam_8bit else 'off'}")
            print(est.table())
            return recipe, 0
    except memory.EstimateError as err:
        return recipe, fail(err)
    return recipe, None
