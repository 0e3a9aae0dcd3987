"""StyleDrop round 2 (library part): sample candidates with a round-1 adapter, then turn the ones a person kept
into an imagefolder dataset and a round-2 recipe. The command is `amused-tune styledrop-round2`
(amused_tune.cli.styledrop_round2), which documents the workflow.

`generate_candidates` writes OUT/*.png (prompt and seed in each PNG's text chunks), OUT/candidates.jsonl and, for a
single-image run, a copy of round 1's reference image; `finalize` writes OUT/metadata.jsonl for the images still
there and OUT/round2.yaml: round 1's recipe training a fresh adapter on that folder into RUN-round2/.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from amused_tune.common import RECIPE_FILE, torch_dtype
from amused_tune.writes import write_file, write_with

CANDIDATES = "candidates.jsonl"


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


def check_run(run: Path) -> None:
    """A round-1 output folder holds recipe.yaml and adapter/; raises ValueError saying what is missing."""
    if not (run / RECIPE_FILE).is_file():
        raise ValueError(f"{run}: no recipe.yaml here; pass the output.dir of a finished round-1 run")
    if not (run / "adapter").is_dir():
        raise ValueError(f"{run}: no adapter/ here; round 1 must finish (or be a LoRA run) first")


def generate_candidates(recipe, run: Path, out: Path, prompts: list[str], args: CandidateOptions) -> list[dict]:
    """Sample the candidates with the round-1 adapter; returns the rows written to candidates.jsonl."""
    import torch

    from amused_tune.model import adapters
    from amused_tune.data.cards import resolve_config
    from amused_tune.data.sources import resolve_path
    from amused_tune.model.bases import load_components
    from amused_tune.sampling.sampler import StyleDropGuidance, generate, png_info, to_pil
    from amused_tune.model.sampling_defaults import resolve_sampling

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    scales = tuple(args.adapter_scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"adapter scales must be > 0, got {list(scales)}")
    comps = load_components(recipe.model.base)
    adapter_name = adapters.load_lora(comps.transformer, run / "adapter")
    if recipe.adapter.text_encoder:
        adapters.load_lora(comps.text_encoder, run / "adapter", part="text_encoder")
        adapters.merge_adapters(comps.text_encoder)
    if not args.styledrop_guidance and scales == (1.0,):
        adapters.merge_adapters(comps.transformer)
    dtype = torch_dtype(recipe.model.dtype) if device.type == "cuda" else torch.float32
    for module, module_dtype in ((comps.transformer, dtype), (comps.text_encoder, dtype), (comps.vqvae, torch.float32)):
        module.to(device, module_dtype)
    v = recipe.validation  # unset values: the base's sampling.json, else diffusers' defaults
    sampling, _ = resolve_sampling(recipe.model.base, steps=args.steps or v.steps, guidance=v.guidance if
                                   args.guidance is None else args.guidance, guidance_schedule=v.guidance_schedule,
                                   temperature=v.temperature)
    styledrop = StyleDropGuidance(*args.styledrop_guidance) if args.styledrop_guidance else None

    out.mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for scale in scales:
        if scales != (1.0,):
            adapters.set_adapter_scales(comps.transformer, {adapter_name: scale})
        tag = "" if len(scales) == 1 else f"-x{scale:g}"
        for i, prompt in enumerate(prompts):
            seeds = [args.seed + k + j for j in range(args.per_prompt)]
            _, images = generate(comps, [prompt], seeds, **sampling, styledrop=styledrop)
            for seed, image in zip(seeds, to_pil(images)):
                file = f"{i:03d}-{slug(prompt)}-seed{seed}{tag}.png"
                info = png_info({"prompt": prompt, "seed": seed, **sampling, "adapter": str(run / "adapter"),
                                 "adapter_scale": scale})
                write_with(out / file, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), "a round-2 candidate")
                rows.append({"file_name": file, "text": prompt, "seed": seed, "adapter_scale": scale})
            k += args.per_prompt
    data = resolve_config(recipe.data)
    if data.source == "single_image" and args.reference:
        reference = resolve_path(data.path)
        name = "reference" + reference.suffix.lower()
        write_with(out / name, lambda tmp: shutil.copyfile(reference, tmp), "the reference image")
        rows.append({"file_name": name, "text": data.prompt})
    write_file(out / CANDIDATES, "".join(json.dumps(r) + "\n" for r in rows), "the candidates' list")
    return rows


def pick(out: Path, picker) -> tuple[int, int]:
    """Automatic feedback: delete the candidates in `out` that `picker` rejects (round 1's reference image is
    kept). `picker(images, prompts, reference)` gets the candidates (PIL images), their prompts and the reference
    image (or None) and returns one bool per candidate. Returns (kept, candidates)."""
    from PIL import Image

    rows = [json.loads(line) for line in (out / CANDIDATES).read_text().splitlines() if line.strip()]
    drawn = [r for r in rows if "seed" in r and (out / r["file_name"]).is_file()]
    references = [out / r["file_name"] for r in rows if "seed" not in r and (out / r["file_name"]).is_file()]
    reference = Image.open(references[0]).convert("RGB") if references else None
    images = [Image.open(out / r["file_name"]).convert("RGB") for r in drawn]
    keep = list(picker(images, [r["text"] for r in drawn], reference))
    for row, kept in zip(drawn, keep, strict=True):
        if not kept:
            (out / row["file_name"]).unlink()
    return sum(keep), len(drawn)


def finalize(recipe, run: Path, out: Path) -> Path:
    """metadata.jsonl for the candidates still in `out`, and round2.yaml training a fresh adapter on them."""
    if not (out / CANDIDATES).is_file():
        raise ValueError(f"{out}: no {CANDIDATES}; generate candidates first (--prompts prompts.txt)")
    rows = [json.loads(line) for line in (out / CANDIDATES).read_text().splitlines() if line.strip()]
    kept = [{"file_name": r["file_name"], "text": r["text"]} for r in rows if (out / r["file_name"]).is_file()]
    if not kept:
        raise ValueError(f"{out}: every candidate was deleted; generate new ones with another --seed")
    write_file(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in kept), "the round-2 captions")

    recipe = recipe.to_dict()
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
    write_file(path, header + yaml.safe_dump(json.loads(json.dumps(recipe)), sort_keys=False), "the round-2 recipe")
    return path
