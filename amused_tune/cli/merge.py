"""`amused-tune merge OUTPUT_DIR --out DIR`: fuse a run's LoRA into its base and save a full pipeline folder
(amused_tune.share.merge does the work)."""

from __future__ import annotations

import sys
from pathlib import Path

from amused_tune.cli.args import SubcommandParser, fail, quiet_libraries
from amused_tune.cli.checks import adapter_problem, folder_problem, read_yaml
from amused_tune.common import DTYPE_NAMES


def build_parser() -> SubcommandParser:
    p = SubcommandParser(prog="amused-tune merge",
                         description="Fuse a run's LoRA into its base U-ViT; write a pipeline folder AmusedPipeline loads.")
    p.add_argument("run", metavar="OUTPUT_DIR", help="the run's output.dir (or an adapter folder / .safetensors file)")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--base", default=None,
                   help="base model (default: the base the run recorded, e.g. toy; an adapter without a record needs it)")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength (1.0: as trained)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="precision of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str]) -> int:
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    from amused_tune.model.bases import missing_base

    problem = inputs_problem(Path(args.run).expanduser(), args.out) or (args.base and missing_base(args.base, "--base"))
    if problem:
        return fail(problem)
    from amused_tune.model.adapters import AdapterError
    from amused_tune.share.merge import MergeError, merge_run

    quiet_libraries()
    try:
        announce_base(Path(args.run).expanduser(), args.base)
        merge_run(args.run, args.out, base=args.base, scale=args.scale, dtype=args.dtype, overwrite=args.overwrite)
    except (MergeError, AdapterError) as err:
        return fail(err)
    print(f"merged {args.run} into {args.out}: load it with AmusedPipeline.from_pretrained({str(args.out)!r}) "
          f"or amused-tune sample --base {args.out}")
    return 0


def announce_base(run: Path, base: str | None) -> None:
    """One line on stderr: the base chosen and why; a warning when --base is not the one the run recorded."""
    from amused_tune.model.provenance import mismatch_warning
    from amused_tune.share.merge import choose_base

    if not run.exists():
        return
    chosen, record = choose_base(run, base)
    if base is None:
        print(f"base: {chosen} (recorded by {run})", flush=True)
    elif mismatch_warning(run, record, base):
        print(mismatch_warning(run, record, base), file=sys.stderr)


def inputs_problem(run: Path, out: str) -> str | None:
    """What is wrong with the run (its recipe.yaml, its adapter file) or --out, checked before any model loads."""
    recipe = run / "recipe.yaml"
    if recipe.is_file():
        try:
            read_yaml(recipe)
        except ValueError as err:
            return str(err)
    full_run = (run / "transformer" / "config.json").is_file() and not (run / "adapter").is_dir()
    return folder_problem("--out", out) or (None if full_run else adapter_problem(str(run)))
