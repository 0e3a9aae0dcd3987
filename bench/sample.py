"""Time the kit's MaskGIT sampler against diffusers' `AmusedPipeline` on the same components.

    python bench/sample.py                      # GPU: random-weight amused-256, fp16, 12 steps, batch 1 and 8
    python bench/sample.py --resolution 512 --dtype bf16 --compile
    python bench/sample.py --tiny               # CPU smoke run on the tiny model

Both sides do the whole job: encode the prompt (and the empty prompt), 12 U-ViT steps with classifier-free
guidance, VQ decode. The kit runs twice: ``draws=exact`` (diffusers' random draws from CPU generators, bit-identical
tokens at batch 1) and ``draws=fast`` (one uniform per token). diffusers gets a generator on the device, its fastest
setting. Median of --repeats timed calls after --warmup calls, synchronised on the device. Prints a table; "x" is
diffusers' time over the kit's (above 1 = the kit is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amused_tune.model.bases import build_real_size, build_tiny  # noqa: E402
from amused_tune.sampling.sampler import generate  # noqa: E402

PROMPT = "a photo of a red fox in the snow"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in seconds, the device synchronised around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    """Build the components, time both samplers for every batch size, return one row per batch size."""
    try:
        from diffusers import AmusedPipeline
    except ImportError:  # newer diffusers keep it only under deprecated/
        from diffusers.pipelines.deprecated.amused import AmusedPipeline

    if args.tiny:
        device, dtype, comps = torch.device("cpu"), torch.float32, build_tiny()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/sample.py needs a CUDA GPU at real size; use --tiny for a CPU smoke run")
        device, dtype = torch.device("cuda"), DTYPES[args.dtype]
        comps = build_real_size(args.resolution)
        for part in (comps.transformer, comps.text_encoder, comps.vqvae):
            part.to(device, dtype)
    for part in (comps.transformer, comps.text_encoder, comps.vqvae):
        part.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = AmusedPipeline(vqvae=comps.vqvae, tokenizer=comps.tokenizer, text_encoder=comps.text_encoder,
                              transformer=comps.transformer, scheduler=comps.scheduler)
    pipe.set_progress_bar_config(disable=True)

    rows = []
    for bs in args.batch_sizes:
        prompts, seeds = [PROMPT] * bs, list(range(bs))

        def diffusers_call() -> None:
            pipe(prompts, num_inference_steps=args.steps, output_type="pt",
                 generator=torch.Generator(device).manual_seed(0))

        def kit_call(draws: str) -> Callable[[], None]:
            return lambda: generate(comps, prompts, seeds, steps=args.steps, draws=draws, torch_compile=args.compile)

        row = {"batch": bs, "diffusers": timed(diffusers_call, device, args.warmup, args.repeats)}
        for draws in ("exact", "fast"):
            row[draws] = timed(kit_call(draws), device, args.warmup, args.repeats)
        rows.append(row)
    return rows


def format_table(rows: list[dict], title: str) -> str:
    lines = [title, "| batch | diffusers s | kit exact s | x | kit fast s | x |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['diffusers']:.3f} | {r['exact']:.3f} | {r['diffusers'] / r['exact']:.2f} "
            f"| {r['fast']:.3f} | {r['diffusers'] / r['fast']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke run)")
    p.add_argument("--resolution", type=int, choices=[256, 512], default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the kit's U-ViT")
    args = p.parse_args(argv)
    rows = run(args)
    where = ("tiny, CPU, fp32" if args.tiny else
             f"amused-{args.resolution} random weights, {torch.cuda.get_device_name()}, {args.dtype}")
    print(format_table(rows, f"{where}, {args.steps} steps, median of {args.repeats} after {args.warmup} warmups"
                       + (", kit compiled" if args.compile else "")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
