"""``python -m amused_tune.toy build`` rebuilds the toy weights; ``python -m amused_tune.toy eval`` measures them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path


def _field_help(cls) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal right after it), read from the class's source."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _parser() -> argparse.ArgumentParser:
    from amused_tune.toy.build import BuildConfig

    parser = argparse.ArgumentParser(prog="python -m amused_tune.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild the toy pipeline from scratch (CPU, one thread, ~20 min on a busy 2-core machine)")
    b.add_argument("--out", default=None, help="output pipeline folder (default: amused_tune/toy/weights)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, robust on a shared CPU)")
    helps = _field_help(BuildConfig)
    for f in fields(BuildConfig):
        b.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{helps.get(f.name, '')} (default: {f.default})")
    w = sub.add_parser("sets", help="write the fine-tuning sets: the new concept's imagefolder, the style images")
    w.add_argument("--root", default=".", help="the kit's folder (writes ROOT/assets/toy_concept, ROOT/assets/quickstart, ROOT/assets/styledrop_toy)")
    e = sub.add_parser("eval", help="caption-match rates of the toy base, or of a fine-tuning run on it")
    e.add_argument("--dir", default=None, help="pipeline folder (default: the shipped toy weights)")
    e.add_argument("--adapter", default=None, help="a run folder of a fine-tuning run on model.base=toy")
    e.add_argument("--styledrop-sweep", action="store_true",
                   help="with --adapter: style rates under plain guidance and StyleDrop guidance (lambda_a, lambda_b)")
    e.add_argument("--styledrop", action="store_true",
                   help="train a StyleDrop recipe (every round of it) on each style image and print each one's rates "
                        "on new content, the worst image's and the [v] samples by background colour (see "
                        "amused_tune/toy/styledrop_eval.py)")
    e.add_argument("--random", type=int, default=0, metavar="N",
                   help="with --styledrop: also N random style images (random shape, colour and background, drawn "
                        "with --seed); with --images none, only those")
    e.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="with --styledrop: also N random pairs of style images, each pair trained together as a folder")
    e.add_argument("--seed", type=int, default=0, help="with --random / --pairs: the seed of the draw")
    e.add_argument("--jobs", type=int, default=1, help="with --styledrop: train this many style images at a time, "
                                                       "each in its own process with one thread")
    e.add_argument("--picture", default=None, help="with --styledrop: write the worst image's before/after picture "
                                                   "(base above, adapter below, one [v] prompt per background) here")
    e.add_argument("--round2", action="store_true", help="with --styledrop: the same as --rounds 2")
    e.add_argument("--rounds", type=int, default=None, help="with --styledrop: styledrop.rounds (default: the "
                                                            "recipe's); later rounds draw candidates for the world "
                                                            "captions that are not evaluation prompts")
    e.add_argument("--per-prompt", type=int, default=None, help="with --styledrop: styledrop.per_prompt, candidates "
                                                                "per world caption in each later round (default: the "
                                                                "recipe's)")
    e.add_argument("--recipe", default=None, help="with --styledrop: the recipe to train (default recipes/quickstart.yaml)")
    e.add_argument("--images", default=None, help="with --styledrop: comma-separated fixed style image names "
                                                  "(default all six; none: no fixed image)")
    e.add_argument("--adapter-scales", type=float, nargs="+", default=None, metavar="SCALE",
                   help="with --styledrop: styledrop.adapter_scales, the strengths candidates are drawn at "
                        "(default: the recipe's)")
    e.add_argument("--workdir", default=None, help="with --styledrop: keep each image's runs and round-2 candidates "
                                                   "in this folder (default: a temporary folder, deleted at the end)")
    e.add_argument("--out", default=None, help="with --styledrop: write the numbers to this JSON file "
                                               "(default styledrop_eval.json)")
    e.add_argument("--prompts", type=int, default=50, help="world prompts (with --styledrop: new-content prompts, "
                                                           "default 30)")
    e.add_argument("--seeds", type=int, default=2)
    e.add_argument("--threads", type=int, default=1)
    for p in (parser, b, w, e):  # options are named in full: --prompt is a mistake, not --prompts
        p.allow_abbrev = False
    return parser


def _eval_problem(args) -> str | None:
    for flag in ("prompts", "seeds", "threads"):
        if getattr(args, flag) < 1:
            return f"--{flag} must be >= 1, got {getattr(args, flag)}"
    if args.jobs < 1:
        return f"--jobs must be >= 1, got {args.jobs}"
    for flag in ("random", "pairs"):
        if getattr(args, flag) < 0:
            return f"--{flag} must be >= 0, got {getattr(args, flag)}"
    if args.styledrop and args.images is not None:
        from amused_tune.toy.world import STYLE_IMAGES

        unknown = [n for n in args.images.split(",") if n and n != "none" and n not in STYLE_IMAGES]
        if unknown:
            return f"--images {unknown[0]}: no such style image; known: {', '.join(STYLE_IMAGES)} (or none)"
    if args.styledrop and args.images is not None and not args.images.replace("none", "").strip(",") \
            and not args.random and not args.pairs:
        return "--images none leaves nothing to train: add --random N or --pairs N"
    for flag in ("dir", "adapter"):
        folder = getattr(args, flag, None)
        if folder and not Path(folder).is_dir():
            return f"--{flag} {folder} does not exist: pass a folder"
    return None


PROG = "python -m amused_tune.toy"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _eval_problem(args) if args.command == "eval" else None
    if problem:  # a mistake in the arguments: one line, before any model loads
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    from amused_tune.writes import WRITE_FAILED, describe, is_write_failure

    try:
        return run(args)
    except OSError as err:
        if not is_write_failure(err):
            raise
        print(f"{PROG}: error: {describe(err)}", file=sys.stderr)  # a full disk, a read-only folder: one line
        return WRITE_FAILED


def run(args) -> int:
    import torch

    torch.set_num_threads(getattr(args, "threads", 1))
    if args.command == "sets":
        from amused_tune.toy import world

        root = Path(args.root)
        folder = world.write_imagefolder(root / "assets" / "toy_concept", world.concept_finetune_specs())
        style = root / "assets" / "quickstart" / "toy_style.png"
        style.parent.mkdir(parents=True, exist_ok=True)
        world.render(world.STYLE_EXAMPLE).save(style)
        print(f"wrote {folder} ({len(world.concept_finetune_specs())} images) and {style} "
              f"(caption: {world.caption(world.STYLE_EXAMPLE)!r})")
        captions = world.all_captions()
        for name, header, suffix in (
                ("prior_prompts.txt", "the toy world's 90 captions, without [v]: what the base draws for prior "
                                      "preservation", ""),
                ("round2_prompts.txt", "the toy world's 90 captions in [v] style: what the round-1 adapter draws for "
                                       "StyleDrop round 2", world.STYLE_SUFFIX)):
            (style.parent / name).write_text(f"# {header}\n" + "".join(c + suffix + "\n" for c in captions))
        print(f"wrote {style.parent / 'prior_prompts.txt'} and {style.parent / 'round2_prompts.txt'}")
        styles = root / "assets" / "styledrop_toy"
        styles.mkdir(parents=True, exist_ok=True)
        for name, spec in world.STYLE_IMAGES.items():
            world.render(spec).save(styles / f"{name}.png")
        (styles / "captions.json").write_text(json.dumps(
            {f"{name}.png": world.caption(spec) for name, spec in world.STYLE_IMAGES.items()}, indent=2) + "\n")
        print(f"wrote {len(world.STYLE_IMAGES)} single StyleDrop images to {styles} (captions in captions.json)")
        return 0
    if args.command == "build":
        from amused_tune.toy import WEIGHTS_DIR
        from amused_tune.toy.build import BuildConfig, build

        cfg = BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})
        record = build(Path(args.out) if args.out else WEIGHTS_DIR, cfg)
        print(json.dumps(record, indent=2))
        return 0

    from amused_tune.model.bases import _load_folder
    from amused_tune.toy import toy_dir
    from amused_tune.toy.evaluate import evaluate, read_sampling_defaults

    if args.styledrop:
        from amused_tune.toy.styledrop_eval import DEFAULT_RECIPE, styledrop_eval

        rounds = 2 if args.round2 and args.rounds is None else args.rounds
        overrides = {f"styledrop.{key}": value for key, value in (
            ("rounds", rounds), ("per_prompt", args.per_prompt),
            ("adapter_scales", list(args.adapter_scales) if args.adapter_scales else None)) if value is not None}
        images = None if args.images is None else [n for n in args.images.split(",") if n and n != "none"]
        styledrop_eval(args.recipe or DEFAULT_RECIPE, args.out or "styledrop_eval.json",
                       30 if args.prompts == 50 else args.prompts, tuple(range(args.seeds)), images,
                       workdir=args.workdir, base_dir=args.dir, random=args.random, pairs=args.pairs, seed=args.seed,
                       picture=args.picture, jobs=args.jobs,
                       **overrides)
        return 0
    folder = Path(args.dir) if args.dir else toy_dir()
    comps = _load_folder(folder)
    if args.adapter and args.styledrop_sweep:
        from amused_tune.toy.finetune_eval import styledrop_sweep

        print(json.dumps(styledrop_sweep(comps, Path(args.adapter), read_sampling_defaults(folder)), indent=2))
        return 0
    if args.adapter:
        from amused_tune.toy.finetune_eval import evaluate_run

        print(json.dumps(evaluate_run(comps, Path(args.adapter), read_sampling_defaults(folder)), indent=2))
        return 0
    print(json.dumps(evaluate(comps, args.prompts, tuple(range(args.seeds)), defaults=read_sampling_defaults(folder)),
                     indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
