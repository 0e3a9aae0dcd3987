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
Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import yaml
from amused_tune.cli import SubcommandParser

CANDIDATES = "candidates.jsonl"


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
    p.add_argument("--no-reference", action="store_true", help="do not add round 1's reference image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    return p


def _fail(message) -> int:
    print(f"amused-tune styledrop-round2: error: {message}", file=sys.stderr)
    return 2


def read_run(run: Path):
    """The round-1 recipe of an output folder (its resolved recipe.yaml)."""
    from amused_tune.cli import parse_recipe

    if not (run / "recipe.yaml").is_file():
        raise ValueError(f"{run}: no recipe.yaml here; pass the output.dir of a finished round-1 run")
    if not (run / "adapter").is_dir():
        raise ValueError(f"{run}: no adapter/ here; round 1 must finish (or be a LoRA run) first")
    recipe, _, _ = parse_recipe([str(run / "recipe.yaml")])
    return recipe


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def generate_candidates(args, run: Path, out: Path) -> list[dict]:
    """Sample the candidates with the round-1 adapter; returns the rows written to candidates.jsonl."""
    import torch

    from amused_tune import adapters
    from amused_tune.data import resolve_config, resolve_path
    from amused_tune.models import load_components
    from amused_tune.sampler import StyleDropGuidance, generate, png_info, to_pil

    recipe = read_run(run)
    prompts = read_prompts(args.prompts)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    comps = load_components(recipe.model.base)
    adapters.load_lora(comps.transformer, run / "adapter")
    if recipe.adapter.text_encoder:
        adapters.load_lora(comps.text_encoder, run / "adapter", part="text_encoder")
        adapters.merge_adapters(comps.text_encoder)
    if not args.styledrop_guidance:
        adapters.merge_adapters(comps.transformer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.model.dtype, torch.float32)
    dtype = dtype if device.type == "cuda" else torch.float32
    for module, module_dtype in ((comps.transformer, dtype), (comps.text_encoder, dtype), (comps.vqvae, torch.float32)):
        module.to(device, module_dtype)
    steps = args.steps or recipe.validation.steps
    guidance = recipe.validation.guidance if args.guidance is None else args.guidance
    styledrop = StyleDropGuidance(*args.styledrop_guidance) if args.styledrop_guidance else None

    out.mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for i, prompt in enumerate(prompts):
        seeds = [args.seed + k + j for j in range(args.per_prompt)]
        _, images = generate(comps, [prompt], seeds, steps=steps, guidance=guidance, styledrop=styledrop)
        for seed, image in zip(seeds, to_pil(images)):
            name = f"{i:03d}-{slug(prompt)}-seed{seed}.png"
            image.save(out / name, pnginfo=png_info({"prompt": prompt, "seed": seed, "steps": steps,
                                                      "guidance": guidance, "adapter": str(run / "adapter")}))
            rows.append({"file_name": name, "text": prompt, "seed": seed})
        k += args.per_prompt
    data = resolve_config(recipe.data)
    if data.source == "single_image" and not args.no_reference:
        reference = resolve_path(data.path)
        name = "reference" + reference.suffix.lower()
        shutil.copyfile(reference, out / name)
        rows.append({"file_name": name, "text": data.prompt})
    (out / CANDIDATES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def finalize(run: Path, out: Path) -> Path:
    """metadata.jsonl for the candidates still in `out`, and round2.yaml training a fresh adapter on them."""
    if not (out / CANDIDATES).is_file():
        raise ValueError(f"{out}: no {CANDIDATES}; generate candidates first (--prompts prompts.txt)")
    rows = [json.loads(line) for line in (out / CANDIDATES).read_text().splitlines() if line.strip()]
    kept = [{"file_name": r["file_name"], "text": r["text"]} for r in rows if (out / r["file_name"]).is_file()]
    if not kept:
        raise ValueError(f"{out}: every candidate was deleted; generate new ones with another --seed")
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    recipe = read_run(run).to_dict()
    data = recipe["data"]
    recipe["data"] = {"source": "imagefolder", "path": str(out.resolve()), "caption_column": "text",
                      **{k: data[k] for k in ("center_crop", "random_flip", "cache", "cache_dir", "on_bad_sample",
                                              "num_workers")}}
    recipe["train"]["resume"] = "auto"
    recipe["output"]["dir"] = str(run.resolve()) + "-round2"
    header = (f"# StyleDrop round 2: round 1 ({run}) sampled candidates, a person kept {len(kept)} of {len(rows)};\n"
              "# this trains a fresh adapter on them with round 1's settings.\n"
              f"# command: amused-tune {out / 'round2.yaml'}\n")
    path = out / "round2.yaml"
    path.write_text(header + yaml.safe_dump(json.loads(json.dumps(recipe)), sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of `amused-tune styledrop-round2 ...` (argv without the subcommand). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "round2"
    if args.finalize == bool(args.prompts):
        return _fail("pass --prompts prompts.txt (generate candidates) or --finalize (after picking), not both")
    if args.per_prompt < 1:
        return _fail("--per-prompt must be >= 1")

    from amused_tune.adapters import AdapterError
    from amused_tune.data import DataError
    from amused_tune.models import BaseModelError
    from amused_tune.sampler import SampleError

    try:
        if args.finalize:
            path = finalize(run, out)
            print(f"round-2 dataset: {out} ({out / 'metadata.jsonl'})\ntrain round 2 with:\n  amused-tune {path}")
            return 0
        if (out / CANDIDATES).is_file():
            return _fail(f"{out} already holds candidates: finalize them with --finalize, or pass --out DIR")
        rows = generate_candidates(args, run, out)
    except (ValueError, DataError, BaseModelError, AdapterError, SampleError) as err:
        return _fail(err)
    print(f"{len(rows)} candidates in {out}\ndelete the ones that miss the style, then run:\n"
          f"  amused-tune styledrop-round2 {run} --finalize")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
