"""`amused-tune push OUTPUT_DIR --repo-id user/name`: upload a finished run with its model card
(amused_tune.share.hub does the work; see its docstring for exactly what goes up). Imports no torch."""

from __future__ import annotations

from pathlib import Path

from amused_tune.cli.args import SubcommandParser, fail
from amused_tune.cli.checks import read_yaml


def build_parser() -> SubcommandParser:
    p = SubcommandParser(prog="amused-tune push",
                         description="Upload a finished run (adapter or transformer/, model card, samples, loss plot, recipe) "
                                     "to the Hugging Face Hub in one commit. Never uploads checkpoints or optimizer state.")
    p.add_argument("output_dir", help="the run's output.dir")
    p.add_argument("--repo-id", required=True, help="user/name or org/name; created if it does not exist")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--token-from-env", action="store_true",
                   help="use the HF_TOKEN environment variable (default: HF_TOKEN or the token saved by `hf auth login`)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, contact nothing")
    return p


def main(argv: list[str]) -> int:
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    recipe = Path(args.output_dir) / "recipe.yaml"
    if recipe.is_file():
        try:
            read_yaml(recipe)
        except ValueError as err:
            return fail(f"{err} (it is uploaded with the run)")
    from amused_tune.share.hub import HubError, push

    try:
        result = push(args.output_dir, args.repo_id, private=args.private, token_from_env=args.token_from_env,
                      dry_run=args.dry_run)
    except HubError as err:
        return fail(err)
    if args.dry_run:
        print(f"would upload {len(result['files'])} files to {args.repo_id}:")
        print("".join(f"  {f}\n" for f in result["files"]), end="")
    else:
        print(f"pushed {len(result['files'])} files to {result['url']}")
    return 0
