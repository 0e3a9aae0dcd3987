"""`amused-tune styledrop-round2`: StyleDrop's second round, training on human-picked samples of round 1.

    amused-tune styledrop-round2 RUN --prompts prompts.txt [--per-prompt 4]    1. generate candidates
    (delete the images you do not want from RUN/round2/)                        2. pick
    amused-tune styledrop-round2 RUN --finalize                                 3. dataset + recipe
    amused-tune RUN/round2/round2.yaml                                          4. train round 2

Step 1 loads the round-1 run (RUN/recipe.yaml and its adapter in RUN/adapter), samples `--per-prompt` images for
every line of prompts.txt (blank lines and lines starting with # are skipped) into RUN/round2/, with the prompt
and seed in each PNG's text chunks and in RUN/round2/candidates.jsonl, and copies round 1's reference image
there too. Step 3 writes RUN/round2/metadata.jsonl for the images still there (an imagefolder dataset) and
RUN/round2/round2.yaml: round 1's recipe training a fresh adapter on that folder into RUN-round2/.
With automatic feedback, steps 1-3 are one command: `--pick toy` (the toy world's classifier, model.base=toy)
or `--pick clip --clip-model NAME` (a CLIP model scores content and style; amused_tune/styledrop/clip_picker.py)
deletes the candidates it rejects and finalizes:

    amused-tune styledrop-round2 RUN --prompts prompts.txt --pick clip --clip-model openai/clip-vit-base-patch32

Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from amused_tune.cli.args import fail, SubcommandParser, parse_recipe, quiet_libraries
from amused_tune.cli.checks import adapter_problem, folder_problem
from amused_tune.common import RECIPE_FILE
from amused_tune.writes import is_write_failure


def build_parser() -> SubcommandParser:
    p = SubcommandParser(prog="amused-tune styledrop-round2",
                         description="StyleDrop round 2: sample candidates with a round-1 adapter, keep the good ones, "
                                     "train on them.")
    p.add_argument("run", help="the round-1 output folder (holds recipe.yaml and adapter/)")
    p.add_argument("--prompts", help="text file, one prompt per line, e.g. 'A house in [V] style'")
    p.add_argument("--finalize", action="store_true",
                   help="after deleting the bad candidates: write metadata.jsonl and round2.yaml")
    p.add_argument("--out", default=None, help="candidate folder (default RUN/round2)")
    p.add_argument("--per-prompt", type=int, default=4, help="candidates per prompt")
    p.add_argument("--seed", type=int, default=0, help="candidate k gets seed + k")
    p.add_argument("--steps", type=int, default=None, help="MaskGIT steps (default: the recipe's validation.steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the recipe's validation.guidance)")
    p.add_argument("--styledrop-guidance", type=float, nargs=2, default=None, metavar=("LAMBDA_A", "LAMBDA_B"),
                   help="StyleDrop's adapter-vs-base guidance instead of --guidance")
    p.add_argument("--pick", choices=("toy", "clip"), default=None,
                   help="automatic feedback instead of a person: keep the candidates a picker accepts, then finalize. "
                        "toy: the toy world's exact classifier (style drawn and caption matched; model.base=toy); "
                        "clip: a CLIP model (--clip-model) keeps those at or above the median in both content "
                        "(image-text score) and style (image-image score to the reference)")
    p.add_argument("--clip-model", default=None, help="with --pick clip: a CLIP model, Hub id or local folder "
                                                      "(e.g. openai/clip-vit-base-patch32)")
    p.add_argument("--adapter-scales", type=float, nargs="+", default=[1.0], metavar="SCALE",
                   help="draw --per-prompt candidates at each of these adapter strengths (1: as trained), e.g. 1 1.5: "
                        "a style round 1 draws too weakly on some content shows up at a higher strength")
    p.add_argument("--no-reference", action="store_true", help="do not add round 1's reference image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    return p


PROG = "amused-tune styledrop-round2"


def read_prompts(path: str) -> list[str]:
    from amused_tune.data.prior import read_prompt_file

    return read_prompt_file(path, "--prompts")


def make_picker(kind: str, clip_model: str | None = None):
    """The picker `kind` names: toy (the toy world's classifier) or clip (a CLIP model, Hub id or folder); raises
    ValueError with a one-line reason when the CLIP model cannot be loaded."""
    if kind == "toy":
        from amused_tune.toy.styledrop_eval import toy_picker

        return toy_picker
    from amused_tune.styledrop.clip_picker import ClipPicker

    return ClipPicker.load(clip_model)


def recipe_picker(recipe):
    """The picker of `styledrop.rounds` (passed to styledrop.rounds.run_rounds); RecipeError saying how to get the
    CLIP model, or how to train without the feedback round, when it cannot be loaded."""
    from amused_tune.recipe import RecipeError

    s = recipe.styledrop
    kind = s.picker(recipe.model.base)
    if kind == "all":
        print("styledrop: every candidate is kept (styledrop.pick=all; set styledrop.clip_model to pick by CLIP "
              "score)")
        return lambda images, prompts, reference=None: [True] * len(images)
    try:
        return make_picker(kind, s.clip_model)
    except ValueError as err:
        raise RecipeError(f"styledrop.clip_model: {err}; or set styledrop.rounds=1 to train round 1 only") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `amused-tune styledrop-round2 ...` (argv without the subcommand). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "round2"
    if args.finalize == bool(args.prompts):
        return fail("pass --prompts prompts.txt (generate candidates) or --finalize (after picking), not both", PROG)
    if args.per_prompt < 1:
        return fail("--per-prompt must be >= 1", PROG)
    if min(args.adapter_scales) <= 0:
        return fail(f"--adapter-scales must be > 0, got {' '.join(f'{x:g}' for x in args.adapter_scales)}", PROG)
    if args.steps is not None and args.steps < 1:
        return fail(f"--steps must be >= 1, got {args.steps}", PROG)
    if (args.pick == "clip") != bool(args.clip_model):
        return fail("--pick clip needs --clip-model NAME (and --clip-model needs --pick clip)", PROG)
    if args.pick and args.finalize:
        return fail("--pick picks while generating: pass it with --prompts, not with --finalize", PROG)
    if not run.is_dir():
        return fail(f"RUN {run} does not exist: pass the output.dir of a finished round-1 run", PROG)
    from amused_tune.styledrop.round2 import check_run

    try:
        check_run(run)
    except ValueError as err:
        return fail(err, PROG)
    problem = folder_problem("--out", out) or (None if args.finalize else adapter_problem(str(run / "adapter")))
    if problem:
        return fail(problem, PROG)

    from amused_tune.model.adapters import AdapterError
    from amused_tune.data.cards import DataError
    from amused_tune.model.bases import BaseModelError
    from amused_tune.sampling.sampler import SampleError
    from amused_tune.styledrop.round2 import CANDIDATES, CandidateOptions, finalize, generate_candidates, pick

    quiet_libraries()
    try:
        recipe, _, _ = parse_recipe([str(run / RECIPE_FILE)])
        if args.finalize:
            path = finalize(recipe, run, out)
            print(f"round-2 dataset: {out} ({out / 'metadata.jsonl'})\ntrain round 2 with:\n  amused-tune {path}")
            return 0
        if (out / CANDIDATES).is_file():
            return fail(f"{out} already holds candidates: finalize them with --finalize, or pass --out DIR", PROG)
        options = CandidateOptions(per_prompt=args.per_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                   styledrop_guidance=args.styledrop_guidance, reference=not args.no_reference,
                                   device=args.device, adapter_scales=tuple(args.adapter_scales))
        rows = generate_candidates(recipe, run, out, read_prompts(args.prompts), options)
        if args.pick:
            kept, total = pick(out, make_picker(args.pick, args.clip_model))
            path = finalize(recipe, run, out)
            print(f"{args.pick} picker kept {kept} of {total} candidates in {out}\ntrain round 2 with:\n"
                  f"  amused-tune {path}")
            return 0
    except (ValueError, OSError, DataError, BaseModelError, AdapterError, SampleError) as err:
        if is_write_failure(err):
            raise  # a failed write: amused_tune.cli.main says it in its one line
        return fail(err, PROG)
    kept = [r["file_name"] for r in rows if "seed" not in r]  # the style image itself: round 2 keeps it
    also = f" and the style image ({kept[0]})" if kept else ""
    drawn = len(rows) - len(kept)
    print(f"{drawn} candidates{also} in {out}\ndelete the ones that miss the style, then run:\n"
          f"  amused-tune styledrop-round2 {run} --finalize")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
