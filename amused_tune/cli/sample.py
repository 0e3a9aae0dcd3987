"""`amused-tune sample`: generate images from a base model plus LoRA adapters, on the command line.

    amused-tune sample --base amused/amused-256 --adapter runs/x --prompt "a cat" --num-images 4 --seed 0 --out samples/

Image k (counting over all prompts) gets seed + k. Writes ``OUT/NNN-seedS.png`` per image, with the prompt, seed,
steps, guidance and adapters in its PNG text chunks, and ``OUT/grid.png``. Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from amused_tune.sampling.sampler import (DRAWS, SampleError, StyleDropGuidance, generate, png_info, resolve_draws,
                                           save_grid, to_pil)
from amused_tune.cli.args import fail, DefaultsFormatter, SubcommandParser, quiet_libraries
from amused_tune.cli.checks import adapter_problem, folder_problem, image_problem
from amused_tune.sampling.pixel_art import (
    PixelArtError, active, check_grid, chosen_settings, palette_from_record, pixelate, resolve_palette, shown,
)
from amused_tune.sampling.preview import viewable_tiles
from amused_tune.common import DTYPE_NAMES, place, torch_dtype
from amused_tune.model.sampling_defaults import GUIDANCE_SCHEDULES, SamplingDefaultsError, describe_taken, resolve_sampling
from amused_tune.model.bases import missing_base
from amused_tune.writes import write_with

EXAMPLES = """examples:
  amused-tune sample --base toy --prompt "a red circle on a white background"
      the toy base at its own settings (its sampling.json), one image in samples/
  amused-tune sample --adapter runs/quickstart-lora --prompt "a red circle on a white background in [v] style" \\
      --num-images 4 --seed 0 --out samples/
      a run's LoRA on the base it was trained on, at the settings it was validated with (both recorded by the run)
  amused-tune sample --base toy --prompt "a yellow square on a blue background" \\
      --image assets/quickstart/toy_style.png --mask assets/quickstart/toy_mask.png --out samples/inpaint/
      inpainting: redraw the white part of the mask in the image (without --mask: a variation, --strength 0.6)
"""


class SampleHelp(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """Option help as every subcommand's, examples kept as written."""


def build_parser() -> SubcommandParser:
    p = SubcommandParser(prog="amused-tune sample", description="Generate images with aMUSEd (+ LoRA adapters).",
                         epilog=EXAMPLES, formatter_class=SampleHelp)
    p.add_argument("--base", default=None,
                   help="Hub id, local pipeline folder, 'toy' (the small pretrained base that ships with the kit) or "
                        "'tiny' (random weights: plumbing only, draws noise) (default: the base the --adapter was "
                        "trained on, as it recorded; without an adapter, amused/amused-256)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable; each gets --num-images images")
    p.add_argument("--negative-prompt", default=None, help="what the images should not show")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image k gets seed + k")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="MaskGIT steps (default: the adapter's recorded settings, else the base's sampling.json, "
                        "else 12)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, <= 1: off (default: the adapter's recorded settings, else the "
                        "base's sampling.json, else 10)")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default=None,
                   help="guidance over the steps: constant, linear 0->g, cosine, ramp1 1->g (default: the base's, "
                        "else constant)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                   help="mask schedule: how many tokens stay masked after each step")
    p.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                   help="Gumbel temperature: START END (linear over the steps), or one value (START, 0.01) "
                        "(default: the base's sampling.json, else 2 0)")
    p.add_argument("--min-p", type=float, default=None,
                   help="truncation: never draw a code less likely than MIN_P x the most likely one, in [0, 1) "
                        "(0: off; default: the base's sampling.json, else 0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="truncation: draw only from the K most likely codes (0: off; default: the base's, else 0)")
    p.add_argument("--image", default=None, help="input image for variation / inpainting")
    p.add_argument("--strength", type=float, default=None,
                   help="0..1, share of the schedule to rerun (default 0.6 with --image, 1.0 with --mask)")
    p.add_argument("--mask", default=None, help="inpainting mask, white = regenerate (needs --image)")
    p.add_argument("--adapter", action="append", default=[], help="LoRA: run dir, adapter dir, .safetensors or Hub id")
    p.add_argument("--adapter-scale", type=float, action="append", default=[], help="one per --adapter, in order")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt adapters (runs code)")
    p.add_argument("--styledrop-guidance", type=float, nargs=2, default=None, metavar=("LAMBDA_A", "LAMBDA_B"),
                   help="StyleDrop two-model guidance instead of --guidance (keeps adapters unmerged)")
    p.add_argument("--quantize", choices=["8bit", "4bit"], default=None, help="hold the U-ViT's linear layers in bitsandbytes 8-bit or 4-bit (less GPU memory; CUDA only)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (results do not depend on it)")
    p.add_argument("--draws", choices=DRAWS, default="auto",
                   help="auto (default): fast on CUDA, exact elsewhere; exact: diffusers' random draws (bit-identical "
                        "tokens); fast: one uniform per token")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-ViT")
    pixel = p.add_argument_group("pixel art (docs/pixel_art.md; default: what the --adapter recorded)")
    pixel.add_argument("--pixel-grid", type=int, default=None, metavar="N",
                       help="write each image as an N x N sprite of flat cells (grid.png shows it enlarged)")
    pixel.add_argument("--palette", default=None, metavar="K|FILE|data",
                       help="the sprite's colours: K chosen per image, a .hex (Lospec) or .gpl (GIMP) file, an image "
                            "whose colours are the palette, or data (the adapter's training-set colours)")
    pixel.add_argument("--transparent", action="store_true",
                       help="the background (the outer ring's most common colour) becomes transparent (RGBA)")
    pixel.add_argument("--no-pixel-art", action="store_true",
                       help="ignore the pixel-art settings the adapter recorded: plain images")
    return p


def load_adapters(transformer: torch.nn.Module, sources: list[str], scales: list[float] | None = None,
                  merge: bool = True, allow_pickle: bool = False) -> list[str]:
    """Load LoRA adapters (run dirs, adapter dirs, .safetensors files or Hub ids), each at its scale, all active
    together; `merge` folds them into the weights (faster; StyleDrop guidance needs them unmerged)."""
    from amused_tune.model.adapters import load_lora, merge_adapters, set_adapter_scales

    scales = scales or [1.0] * len(sources)
    names = [load_lora(transformer, src, scale=s, allow_pickle=allow_pickle) for src, s in zip(sources, scales)]
    if names:
        set_adapter_scales(transformer, dict(zip(names, scales)))
        if merge:
            merge_adapters(transformer)
    return names



DEFAULT_BASE = "amused/amused-256"


def choose_base(args) -> dict | None:
    """Set args.base when it was not given: the base the first adapter recorded, else DEFAULT_BASE; say which, in
    one line. Warn when an explicit --base differs from the recorded one. Returns the record the settings come from
    (None when the adapters record nothing, or were trained on another base than the one used)."""
    from amused_tune.model.provenance import loadable_base, mismatch_warning, read_record, same_base

    found = [(a, read_record(a)) for a in args.adapter]
    found = [(a, r) for a, r in found if r]
    recorded = {r["base"] for _, r in found}
    if len(recorded) > 1:
        which = ", ".join(f"{a}: {r['base']}" for a, r in found)
        raise SampleError(f"the adapters were trained on different bases ({which}): pass --base")
    source, record = found[0] if found else (None, None)
    if args.base is None:
        args.base = loadable_base(record) if record else DEFAULT_BASE
        why = f"recorded by the adapter {source}" if record else (
            "the default: pass --base" if not args.adapter else f"the default: {args.adapter[0]} records no base")
        print(f"base: {args.base} ({why})", flush=True)
        args.recorded_base = record["base"] if record else None
        return record
    args.recorded_base = record["base"] if record else None
    if record and not (same_base(args.base, record["base"]) or same_base(args.base, loadable_base(record))):
        warning = mismatch_warning(source, record, args.base)
        if warning:
            print(warning, file=sys.stderr)
        return None
    return record


def _sampling_settings(args, record: dict | None) -> dict:
    """steps, guidance, guidance_schedule, temperature: the flags given, else the settings the adapter recorded
    (those it was validated with), else the base's sampling.json, else diffusers' defaults; what did not come from
    a flag is said on stderr."""
    from amused_tune.model.provenance import recorded_sampling

    t = args.temperature
    given = dict(steps=args.steps, guidance=args.guidance, guidance_schedule=args.guidance_schedule,
                 temperature=None if t is None else tuple(t) if len(t) == 2 else t[0], min_p=args.min_p,
                 top_k=args.top_k)
    from_adapter = {k: v for k, v in recorded_sampling(record).items() if given.get(k) is None}
    values, taken = resolve_sampling(args.base, **{**given, **from_adapter})
    if from_adapter:
        print(describe_taken(f"the adapter (validated on {record['base']})", from_adapter), file=sys.stderr)
    if taken:
        print(describe_taken(args.base, taken), file=sys.stderr)
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point of `amused-tune sample ...` (argv without the word "sample"). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        argv = argv[1:]
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    problem = usage_problem(args)  # everything that can be checked before loading a model
    if problem:
        return fail(problem, "amused-tune sample")
    device = resolve_device(args)
    scales = args.adapter_scale or [1.0] * len(args.adapter)
    dtype = torch_dtype(args.dtype) if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + k for k in range(len(prompts))]

    from amused_tune.model.adapters import AdapterError
    from amused_tune.model.bases import BaseModelError

    quiet_libraries()
    try:
        record = choose_base(args)
        sampling = _sampling_settings(args, record)
        sprites = sprite_settings(args, record)  # --pixel-grid, --palette, --transparent
        comps = load_models(args, device, dtype, scales)
        if sprites:
            check_grid(sprites["grid"], (comps.resolution, comps.resolution))
        images = sample_images(args, comps, prompts, seeds, sampling, device)
    except AdapterError as err:
        recorded = getattr(args, "recorded_base", None)
        hint = (f" (it was trained on {recorded}: pass --base {recorded}, or leave --base out)"
                if recorded and recorded != args.base else "")
        return fail(f"{err}{hint}", "amused-tune sample")
    except (SampleError, BaseModelError, FileNotFoundError, SamplingDefaultsError, PixelArtError) as err:
        return fail(str(err), "amused-tune sample")

    common = {
        "base": args.base, **sampling, "schedule": args.schedule, "negative_prompt": args.negative_prompt or "",
        "adapter": [{"source": a, "scale": s} for a, s in zip(args.adapter, scales)],
        "styledrop_guidance": args.styledrop_guidance, "draws": resolve_draws(args.draws, device), "quantize": args.quantize,
        "dtype": str(dtype).removeprefix("torch."), "sampler": "amused-tune",
    }
    if args.image:
        common.update(image=args.image, strength=strength_of(args), mask=args.mask)
    if sprites:  # the files are the sprites; grid.png shows them enlarged
        images = [pixelate(im, sprites["grid"], palette_from_record(sprites), sprites["transparent"]) for im in images]
        common["pixel_art"] = {k: v for k, v in sprites.items() if k != "data_colours"}
    write_images(Path(args.out), images, prompts, seeds, common)
    return 0


def strength_of(args) -> float:
    """--strength, else 1.0 for text-to-image and inpainting, 0.6 for a variation of --image."""
    return args.strength if args.strength is not None else (1.0 if args.mask else 0.6 if args.image else 1.0)


def resolve_device(args) -> torch.device:
    return torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                        "cpu" if args.device == "auto" else args.device)


def usage_problem(args) -> str | None:
    """The first mistake in the arguments that shows before any model loads (one line), or None."""
    if args.mask and not args.image:
        return "--mask needs --image (the picture to paint into)"
    problems = [image_problem(flag, path) for flag, path in (("--image", args.image), ("--mask", args.mask)) if path]
    problems += [adapter_problem(a, args.allow_pickle) for a in args.adapter] + [folder_problem("--out", args.out)]
    problems.append(args.base and missing_base(args.base, "--base"))
    if any(problems):
        return next(p for p in problems if p)
    if args.adapter_scale and len(args.adapter_scale) != len(args.adapter):
        return (f"{len(args.adapter_scale)} --adapter-scale for {len(args.adapter)} --adapter: "
                "give one per adapter, or none")
    if args.styledrop_guidance and not args.adapter:
        return "--styledrop-guidance needs at least one --adapter (it contrasts adapter and base model)"
    if args.temperature and len(args.temperature) > 2:
        return "--temperature takes one value or two (START END)"
    pixel_problem = sprite_options_problem(args)
    if pixel_problem:
        return pixel_problem
    if args.num_images < 1 or args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        return "--num-images, --batch-size and --steps must be >= 1"
    if not 0.0 <= strength_of(args) <= 1.0:
        return f"--strength must be in [0, 1], got {strength_of(args)}"
    device = resolve_device(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device}: CUDA is not available on this machine"
    if args.quantize and device.type != "cuda":
        return (f"--quantize {args.quantize} needs a CUDA GPU (bitsandbytes' int8/nf4 matmul); "
                "pass --device cuda or drop --quantize")
    return None


def sprite_options_problem(args) -> str | None:
    """A bad --pixel-grid (N < 1) or --palette (K out of range, a missing file, no colours), before a model loads."""
    try:
        check_grid(args.pixel_grid)
        if args.palette not in (None, "data"):
            resolve_palette(args.palette)
    except PixelArtError as err:
        return str(err)
    return None


def sprite_settings(args, record: dict | None) -> dict | None:
    """The pixel-art settings to sample with: the flags, else what the adapter recorded (said on stderr)."""
    recorded = None if args.no_pixel_art else (record or {}).get("pixel_art")
    settings, taken = chosen_settings(args.pixel_grid, args.palette, args.transparent, recorded)
    if taken:
        print("pixel art from the adapter: " + ", ".join(f"{k} {v}" for k, v in taken.items())
              + " (--no-pixel-art: plain images)", file=sys.stderr)
    return settings if active(settings) else None


def load_models(args, device: torch.device, dtype: torch.dtype, scales: list[float]):
    """The base with its adapters (merged unless StyleDrop guidance needs them apart), placed, maybe quantized."""
    from amused_tune.model.bases import load_components

    print(f"loading base model {args.base} ...", flush=True)
    comps = load_components(args.base)
    load_adapters(comps.transformer, args.adapter, scales, merge=not args.styledrop_guidance,
                  allow_pickle=args.allow_pickle)
    place(comps.text_encoder, device, dtype)
    place(comps.vqvae, device, torch.float32 if getattr(comps.vqvae.config, "force_upcast", False) else dtype)
    place(comps.transformer, torch.device("cpu") if args.quantize else device, dtype)
    if args.quantize:  # cast first: quantized weights must not be cast again
        from amused_tune.model.quantize import quantize_linear_layers

        quantize_linear_layers(comps.transformer, args.quantize, dtype, device, under_lora=True)
        comps.transformer.to(device)  # the rest (norms, embeddings) follows; quantized layers stay as they are
    return comps


def sample_images(args, comps, prompts: list[str], seeds: list[int], sampling: dict, device: torch.device) -> list:
    """The PIL images, --batch-size prompts at a time."""
    styledrop = StyleDropGuidance(*args.styledrop_guidance) if args.styledrop_guidance else None
    steps = sampling.get("steps")
    print(f"sampling {len(prompts)} image{'' if len(prompts) == 1 else 's'} ({steps} step{'' if steps == 1 else 's'} "
          f"each, {device.type}) ...", flush=True)
    images = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        _, imgs = generate(
            comps, prompts[chunk], seeds[chunk], **sampling,
            negative_prompt=args.negative_prompt, schedule=args.schedule,
            image=args.image, strength=strength_of(args), mask=args.mask, styledrop=styledrop, draws=args.draws,
            torch_compile=args.compile,
        )
        images.extend(to_pil(imgs))
    return images


def write_images(out: Path, images: list, prompts: list[str], seeds: list[int], common: dict) -> None:
    """One PNG per image (prompt, seed and settings in its text chunks) and grid.png, each path printed."""
    for k, (img, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        info = png_info({"prompt": prompt, "seed": seed, **common})
        path = write_with(out / f"{k:03d}-seed{seed}.png", lambda tmp: img.save(tmp, format="PNG", pnginfo=info),
                          "a sampled image")
        print(path)
    # the grid is for looking at: small images scaled up (nearest) and labelled; the files above stay as generated
    tiles = viewable_tiles([shown(im) for im in images], prompts)  # sprites: enlarged, transparency on a checkerboard
    grid = save_grid(tiles, out / "grid.png", {"prompts": prompts, "seeds": seeds, **common})
    print(grid)


if __name__ == "__main__":
    raise SystemExit(main())
