"""StyleDrop round 2 (library part): sample candidates with a round-1 adapter, then turn the ones kept (by a person
or a picker) into an imagefolder dataset and a round-2 recipe. The command is `amused-tune styledrop-round2`
(amused_tune.cli.styledrop_round2), which documents the workflow; `styledrop.rounds` runs the same steps inside
`amused-tune RECIPE.yaml` (amused_tune.styledrop.rounds).

`generate_candidates` writes OUT/*.png (prompt and seed in each PNG's text chunks), OUT/candidates.jsonl and, for a
single-image run, a copy of round 1's reference image. It can be killed and rerun: each image is written aside and
renamed into place, each finished batch is appended to OUT/candidates.partial.jsonl, a rerun draws only what is
missing (an image depends only on its prompt and seed), and candidates.jsonl appears, whole, at the end. `pick`
records its decisions in OUT/picked.json before deleting anything; `finalize` writes OUT/metadata.jsonl for the
images still there and OUT/round2.yaml: round 1's recipe training a fresh adapter on that folder into RUN-round2/.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from amused_tune.common import RECIPE_FILE, read_jsonl, torch_dtype
from amused_tune.writes import write_file, write_with

CANDIDATES = "candidates.jsonl"
PARTIAL = "candidates.partial.jsonl"  # the batches drawn so far, while drawing
PICKED = "picked.json"  # a picker's decisions, written before any candidate is deleted


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


@dataclass
class CandidateOptions:
    """How the candidates are sampled (the command's options)."""

    per_prompt: int = 4
    seed: int = 0
    steps: int | None = None  # default: the recipe's validation.steps
    guidance: float | None = None  # default: the recipe's validation.guidance
    styledrop_guidance: tuple[float, float] | None = None  # (lambda_A, lambda_B) instead of guidance
    reference: bool = True  # copy round 1's reference image among the candidates
    device: str = "auto"
    adapter_scales: tuple[float, ...] = (1.0,)  # per_prompt candidates at each of these adapter strengths
    batch_size: int = 8  # candidates per sampling call (an image depends only on its prompt and seed, not its batch)


def check_run(run: Path) -> None:
    """A round-1 output folder holds recipe.yaml and adapter/; raises ValueError saying what is missing."""
    if not (run / RECIPE_FILE).is_file():
        raise ValueError(f"{run}: no recipe.yaml here; pass the output.dir of a finished round-1 run")
    if not (run / "adapter").is_dir():
        raise ValueError(f"{run}: no adapter/ here; round 1 must finish (or be a LoRA run) first")


def candidate_plan(prompts: list[str], args: CandidateOptions) -> list[dict]:
    """Every candidate's row (file name, prompt, seed, adapter strength), in order: `per_prompt` new seeds for each
    prompt at each strength (candidate k has seed args.seed + k)."""
    scales = tuple(args.adapter_scales)
    rows, k = [], 0
    for scale in scales:
        tag = "" if len(scales) == 1 else f"-x{scale:g}"
        for i, prompt in enumerate(prompts):
            for seed in range(args.seed + k, args.seed + k + args.per_prompt):
                rows.append({"file_name": f"{i:03d}-{slug(prompt)}-seed{seed}{tag}.png", "text": prompt, "seed": seed,
                             "adapter_scale": scale})
            k += args.per_prompt
    return rows


def generate_candidates(recipe, run: Path, out: Path, prompts: list[str], args: CandidateOptions) -> list[dict]:
    """Sample the candidates with the round-1 adapter (resuming a killed draw: see the module docstring); returns
    the rows written to candidates.jsonl."""
    import torch

    from amused_tune.model import adapters
    from amused_tune.data.cards import resolve_config
    from amused_tune.data.sources import resolve_path
    from amused_tune.model.bases import load_components
    from amused_tune.sampling.sampler import StyleDropGuidance, generate, png_info, to_pil
    from amused_tune.model.sampling_defaults import resolve_sampling

    scales = tuple(args.adapter_scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"adapter scales must be > 0, got {list(scales)}")
    plan = candidate_plan(prompts, args)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["file_name"] for r in read_jsonl(out / PARTIAL) if (out / str(r.get("file_name"))).is_file()}
    todo = [r for r in plan if r["file_name"] not in done]
    if todo:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        comps = load_components(recipe.model.base)
        adapter_name = adapters.load_lora(comps.transformer, run / "adapter")
        if recipe.adapter.text_encoder:
            adapters.load_lora(comps.text_encoder, run / "adapter", part="text_encoder")
            adapters.merge_adapters(comps.text_encoder)
        if not args.styledrop_guidance and scales == (1.0,):
            adapters.merge_adapters(comps.transformer)
        dtype = torch_dtype(recipe.model.dtype) if device.type == "cuda" else torch.float32
        for module, module_dtype in ((comps.transformer, dtype), (comps.text_encoder, dtype),
                                     (comps.vqvae, torch.float32)):
            module.to(device, module_dtype)
        v = recipe.validation  # unset values: the base's sampling.json, else diffusers' defaults
        sampling, _ = resolve_sampling(recipe.model.base, steps=args.steps or v.steps, guidance=v.guidance if
                                       args.guidance is None else args.guidance,
                                       guidance_schedule=v.guidance_schedule, temperature=v.temperature)
        styledrop = StyleDropGuidance(*args.styledrop_guidance) if args.styledrop_guidance else None
        for scale in scales:
            batch_rows = [r for r in todo if r["adapter_scale"] == scale]
            if not batch_rows:
                continue
            if scales != (1.0,):
                adapters.set_adapter_scales(comps.transformer, {adapter_name: scale})
            for b in range(0, len(batch_rows), args.batch_size):
                batch = batch_rows[b: b + args.batch_size]
                _, images = generate(comps, [r["text"] for r in batch], [r["seed"] for r in batch], **sampling,
                                     styledrop=styledrop)
                for row, image in zip(batch, to_pil(images)):
                    info = png_info({"prompt": row["text"], "seed": row["seed"], **sampling,
                                     "adapter": str(run / "adapter"), "adapter_scale": scale})
                    write_with(out / row["file_name"], lambda tmp, image=image, info=info: image.save(
                        tmp, format="PNG", pnginfo=info), "a round-2 candidate")
                with (out / PARTIAL).open("a") as partial:  # this batch is drawn: a rerun skips it
                    partial.write("".join(json.dumps(r) + "\n" for r in batch))
    rows = list(plan)
    data = resolve_config(recipe.data)
    if data.source == "single_image" and args.reference:
        reference = resolve_path(data.path)
        name = "reference" + reference.suffix.lower()
        write_with(out / name, lambda tmp: shutil.copyfile(reference, tmp), "the reference image")
        rows.append({"file_name": name, "text": data.prompt})
    write_file(out / CANDIDATES, "".join(json.dumps(r) + "\n" for r in rows), "the candidates' list")
    (out / PARTIAL).unlink(missing_ok=True)
    return rows


def pick(out: Path, picker, references: list | None = None) -> tuple[int, int]:
    """Automatic feedback: delete the candidates in `out` that `picker` rejects (round 1's reference image is
    kept). `picker(images, prompts, reference)` gets the candidates (PIL images), their prompts and the style
    image(s) (`references`, default the reference copied among the candidates; None when there is none) and
    returns one bool per candidate. The decisions go to OUT/picked.json first, so a rerun after a kill deletes
    exactly the same ones. Returns (kept, candidates)."""
    from PIL import Image

    rows = read_jsonl(out / CANDIDATES)
    drawn = [r for r in rows if "seed" in r]
    decided = out / PICKED
    if decided.is_file():
        keep = json.loads(decided.read_text())
    else:
        if references is None:
            found = [out / r["file_name"] for r in rows if "seed" not in r and (out / r["file_name"]).is_file()]
            references = [Image.open(found[0]).convert("RGB")] if found else []
        present = [r for r in drawn if (out / r["file_name"]).is_file()]
        images = [Image.open(out / r["file_name"]).convert("RGB") for r in present]
        reference = (references[0] if len(references) == 1 else references) if references else None
        verdicts = list(picker(images, [r["text"] for r in present], reference))
        keep = {r["file_name"]: bool(k) for r, k in zip(present, verdicts, strict=True)}
        write_file(decided, json.dumps(keep, indent=0) + "\n", "the picker's decisions")
    for name, kept in keep.items():
        if not kept:
            (out / name).unlink(missing_ok=True)
    return sum(keep.values()), len(drawn)


def write_metadata(out: Path) -> list[dict]:
    """OUT/metadata.jsonl (an imagefolder dataset) for the candidates still in `out`; returns its rows."""
    if not (out / CANDIDATES).is_file():
        raise ValueError(f"{out}: no {CANDIDATES}; generate candidates first (--prompts prompts.txt)")
    kept = [{"file_name": r["file_name"], "text": r["text"]} for r in read_jsonl(out / CANDIDATES)
            if (out / r["file_name"]).is_file()]
    if not kept:
        raise ValueError(f"{out}: every candidate was deleted; generate new ones with another --seed")
    write_file(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in kept), "the round-2 captions")
    return kept


def finalize(recipe, run: Path, out: Path) -> Path:
    """metadata.jsonl for the candidates still in `out`, and round2.yaml training a fresh adapter on them."""
    kept = write_metadata(out)
    total = len(read_jsonl(out / CANDIDATES))
    recipe = recipe.to_dict()
    data = recipe["data"]
    recipe["data"] = {"source": "imagefolder", "path": str(out.resolve()), "caption_column": "text",
                      **{k: data[k] for k in ("center_crop", "random_flip", "cache", "cache_dir", "on_bad_sample",
                                              "num_workers")}}
    recipe["train"]["resume"] = "auto"
    recipe["output"]["dir"] = str(run.resolve()) + "-round2"
    recipe["styledrop"]["rounds"] = 1  # a plain run on the kept candidates
    header = (f"# StyleDrop round 2: round 1 ({run}) sampled candidates, {len(kept)} of {total} were kept;\n"
              "# this trains a fresh adapter on them with round 1's settings.\n"
              f"# command: amused-tune {out / 'round2.yaml'}\n")
    path = out / "round2.yaml"
    write_file(path, header + yaml.safe_dump(json.loads(json.dumps(recipe)), sort_keys=False), "the round-2 recipe")
    return path
