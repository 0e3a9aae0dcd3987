"""The kit's training step against diffusers' reference trainer (examples/amused/train_amused.py), on this CPU.

    curl -LO https://raw.githubusercontent.com/huggingface/diffusers/main/examples/amused/train_amused.py
    python bench/cpu_vs_reference.py --reference train_amused.py --threads 1 2

Same math on both sides: real-size amused-256 with random weights (saved once as a local pipeline folder that both
load), LoRA rank 16 / alpha 32 on to_q/to_k/to_v, batch 1, no accumulation, fp32, AdamW, gradient clipping at 1,
no condition dropout (the reference's, given a folder of images, reads the text embeddings before it has encoded
them and stops at the first step; dropped or not, the work per step is the same), no validation, no checkpoints. Configurations: the reference; the kit without its cache (VQ and CLIP run every step,
as in the reference); the kit from its cache (built before the timed steps); with --compile also the kit with
train.compile (compiling takes minutes on a CPU).

Timing: each configuration runs in a fresh process for --steps optimizer steps; a step's time is the interval
between two consecutive AdamW.step calls (so the first step, with its lazy initialisations, is never timed). The
configurations take turns (--rounds rounds, each runs every configuration once) so that load from other jobs on a
shared machine falls on all of them; the median of every timed step is reported, with the machine's load average
before and after. Writes OUT/cpu_vs_reference.json and prints a table (x = reference s/step over the kit's).
The reference is not part of the kit: pass its path (it is not in the diffusers wheel or sdist).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("reference", "kit", "kit-cache", "kit-cache-compile")


def prepare(work: Path, images: int, base: str = "256") -> tuple[Path, Path, Path]:
    """A random-weight pipeline folder (`base`: "256" or "512", real size; "tiny": the kit's tiny model) and the
    images (a plain folder whose file names are the prompts, for the reference; the same images with
    metadata.jsonl, for the kit). Returns (base folder, plain images, kit images); amused-256's are work/base,
    work/plain and work/kit."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from amused_tune.model.bases import build_real_size, build_tiny

    suffix = "" if base == "256" else f"-{base}"
    folder, plain, kit = work / f"base{suffix}", work / f"plain{suffix}", work / f"kit{suffix}"
    if not (folder / "model_index.json").is_file():
        comps = build_tiny() if base == "tiny" else build_real_size(int(base))
        for name in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
            getattr(comps, name).save_pretrained(folder / name)
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "AmusedPipeline", "transformer": ["diffusers", "UVit2DModel"],
            "vqvae": ["diffusers", "VQModel"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "AmusedScheduler"]}))
    size = {"256": (320, 288), "512": (576, 544), "tiny": (40, 36)}[base]
    rng = np.random.default_rng(0)
    for f in (plain, kit):
        f.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        name = f"a picture number {i}.png"
        for f in (plain, kit):
            if not (f / name).is_file():  # rewritten, a file's new mtime would be new data to the cache
                image.save(f / name)
        rows.append(json.dumps({"file_name": name, "text": f"a picture number {i}"}))
    (kit / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder, plain, kit


def torchvision_shim() -> None:
    """The four torchvision transforms the reference uses, for a machine without a torchvision matching its torch
    (PIL resize/crop and a [0, 1] tensor: what torchvision computes for a PIL image)."""
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        pass
    import numpy as np
    import torch
    from PIL import Image

    class Resize:
        def __init__(self, size, interpolation=None):
            self.size = size

        def __call__(self, image):
            w, h = image.size
            scale = self.size / min(w, h)
            return image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                Image.Resampling.BILINEAR)

    class RandomCrop:
        @staticmethod
        def get_params(image, output_size):
            w, h = image.size
            th, tw = output_size
            top = int(torch.randint(0, h - th + 1, (1,)))
            left = int(torch.randint(0, w - tw + 1, (1,)))
            return top, left, th, tw

    class ToTensor:
        def __call__(self, image):
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    functional = types.SimpleNamespace(crop=lambda image, top, left, h, w: image.crop((left, top, left + w, top + h)))
    transforms = types.SimpleNamespace(Resize=Resize, RandomCrop=RandomCrop, ToTensor=ToTensor, functional=functional,
                                       InterpolationMode=types.SimpleNamespace(BILINEAR="bilinear"))
    # imported first: they probe for torchvision once, at import, and must not take this stand-in for it
    import datasets  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AmusedPipeline  # noqa: F401
    from transformers import CLIPTextModelWithProjection  # noqa: F401

    module = types.ModuleType("torchvision")
    module.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    module.transforms = transforms
    sys.modules["torchvision"] = module
    sys.modules["torchvision.transforms"] = transforms


def time_optimizer_steps(path: Path) -> None:
    """Append time.perf_counter() to `path` after every AdamW step (both trainers use torch's AdamW)."""
    import torch

    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        with open(path, "a") as f:
            f.write(f"{time.perf_counter()}\n")
        return result

    torch.optim.AdamW.step = step


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads[0])
    work, stamps = Path(args.work), Path(args.stamps)
    time_optimizer_steps(stamps)
    out = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=work))
    if args.worker == "reference":
        run_reference(args.reference, work, out, args.steps)
        return
    run_kit(work, out, args.steps, cache="cache" in args.worker, compile_="compile" in args.worker)


def run_reference(reference: str, work: Path, out: Path, steps: int) -> None:
    """diffusers' train_amused.py, in this process, on the prepared folder (LoRA r16/a32, batch 1, fp32)."""
    import runpy

    torchvision_shim()
    sys.argv = [reference, "--pretrained_model_name_or_path", str(work / "base"),
                "--instance_data_dir", str(work / "plain"), "--resolution", "256", "--train_batch_size", "1",
                "--max_train_steps", str(steps), "--use_lora", "--lora_r", "16", "--lora_alpha", "32",
                "--learning_rate", "1e-4", "--mixed_precision", "no", "--output_dir", str(out),
                "--checkpointing_steps", "1000000", "--validation_steps", "1000000", "--report_to", "comet_ml",  # not installed: no tracker
                "--cond_dropout_prob", "0.0", "--max_grad_norm", "1.0", "--seed", "0", "--logging_steps", "1"]
    runpy.run_path(reference, run_name="__main__")


def run_kit(work: Path, out: Path, steps: int, cache: bool, compile_: bool = False, extra: tuple = ()) -> dict:
    """The kit's trainer, in this process, on the same folder and settings as the reference (`extra`: more
    recipe overrides)."""
    sys.path.insert(0, str(REPO))
    from amused_tune.cli.args import parse_recipe
    from amused_tune.train.loop import train

    recipe, _, _ = parse_recipe([
        f"--model.base={work / 'base'}", "--model.dtype=fp32", "--data.source=imagefolder", f"--data.path={work / 'kit'}",
        f"--data.cache={'true' if cache else 'false'}", f"--data.cache_dir={work / 'cache'}",
        "--data.center_crop=false", "--adapter.kind=lora", "--adapter.rank=16", "--adapter.alpha=32",
        "--optim.lr=1e-4", "--train.batch_size=1", "--train.grad_accum=1", f"--train.max_steps={steps}",
        "--train.precision=fp32", "--train.device=cpu", "--train.cond_dropout=0.0", "--train.checkpoint_every=1000000",
        f"--train.compile={'true' if compile_ else 'false'}", "--validation.prompts=[]",
        f"--output.dir={out}", "--output.loss_plot=false", *extra])
    return train(recipe)


def load() -> list[float]:
    return list(os.getloadavg())


def run_one(config: str, threads: int, args, work: Path) -> list[float]:
    stamps = work / f"stamps-{config}-{threads}-{time.time_ns()}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--worker", config, "--threads", str(threads), "--steps", str(args.steps),
           "--work", str(work), "--stamps", str(stamps), "--reference", str(args.reference or "")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"{config} ({threads} threads) exited {done.returncode}")
    times = [float(x) for x in stamps.read_text().split()]
    return [b - a for a, b in zip(times, times[1:])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="path to diffusers' examples/amused/train_amused.py")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per process (the first is not timed)")
    p.add_argument("--rounds", type=int, default=3, help="turns each configuration takes")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also time the kit with train.compile (slow to compile)")
    p.add_argument("--only", nargs="+", choices=CONFIGS, help="configurations to run (default: all but compile)")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--stamps", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    configs = list(args.only or [c for c in CONFIGS if args.compile or "compile" not in c])
    if "reference" in configs and not (args.reference and Path(args.reference).is_file()):
        raise SystemExit("pass --reference PATH to diffusers' examples/amused/train_amused.py (see --help)")
    work = Path(args.work or tempfile.mkdtemp(prefix="amused-cpu-bench-"))
    prepare(work, args.images)
    if any("cache" in c for c in configs) and not list((work / "cache").glob("tokens-*/shard-*")):  # once, untimed
        run_one("kit-cache", 1, argparse.Namespace(**{**vars(args), "steps": 1}), work)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(), "load_before": load(),
               "steps_per_process": args.steps, "rounds": args.rounds, "configs": configs, "threads": args.threads,
               "command": "python bench/cpu_vs_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "reference_sha256": hashlib.sha256(Path(args.reference).read_bytes()).hexdigest()
               if args.reference else None, "step_s": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for threads in args.threads:
        for round_ in range(args.rounds):
            for config in configs:
                key = f"{config}@{threads}"
                steps = run_one(config, threads, args, work)
                results["step_s"].setdefault(key, []).extend(steps)
                print(f"[{time.strftime('%H:%M:%S')}] round {round_ + 1} {key}: "
                      + " ".join(f"{s:.2f}" for s in steps) + f" s  (load {load()[0]:.1f})", flush=True)
                results["load_after"] = load()
                (out / "cpu_vs_reference.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f} "
             f"({results['cpu_count']} CPUs)",
             "| config | threads | median s/step | steps timed | x reference |", "|---|---|---|---|---|"]
    medians = {k: statistics.median(v) for k, v in results["step_s"].items()}
    for key, median in medians.items():
        config, threads = key.split("@")
        ref = medians.get(f"reference@{threads}")
        ratio = f"{ref / median:.2f}" if ref else "—"
        lines.append(f"| {config} | {threads} | {median:.2f} | {len(results['step_s'][key])} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
