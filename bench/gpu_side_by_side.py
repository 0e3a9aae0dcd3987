"""The kit against diffusers' reference trainer (examples/amused/train_amused.py) on one GPU, in one run, for the
small-GPU rows of the aMUSEd report: seconds per optimizer step and peak memory, side by side on the same card.

    python bench/gpu_side_by_side.py --reference train_amused.py                   # on the GPU machine
    python bench/gpu_side_by_side.py --write-from bench/results/gpu_side_by_side*.json   # the measured column
    python bench/gpu_side_by_side.py --reference train_amused.py --tiny            # CPU check of this script

Rows: nouns_256_lora_bs1x16, minecraft_512_lora_bs1x8, nouns_256_full8bit_bs1x16 (their batch, accumulation, lr,
adapter and optimizer are read from the recipe files). Configurations per row: `reference` (train_amused.py with
the row's settings, its default precision fp16 as in bench/reference_h100.yaml, VQ and CLIP every step),
`kit` (the recipe as shipped: its cache, bf16, `train.compile: auto` for a run of --run-steps steps, so that it
compiles if such a run would), `kit-eager` (the same with train.compile=false). Each configuration runs in a
fresh process on random-weight real-size models saved once as pipeline folders that both load; the
configurations take turns (--rounds rounds, the order reversed every other round, so that a card's warm-up or
a neighbour's load falls on all of them). A step's time is the interval between two optimizer steps; the last
--timed steps of each process count (the kit with auto: after the step that compiled), their median is reported.
Peak memory: torch.cuda.max_memory_allocated over the process (the kit's cache building included), against the
kit's estimate (`--estimate`), within 15% is the target. Writes OUT/NAME.{json,txt,md} (--name, default
gpu_side_by_side); --write-from writes GPU results into each recipe's `# measured:` header and the README's recipes
table (bench/memory_table.py).
--tiny runs the same on the CPU with the kit's tiny model (fp32, a few steps): it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_vs_reference as side_by_side  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = ("nouns_256_lora_bs1x16", "minecraft_512_lora_bs1x8", "nouns_256_full8bit_bs1x16")
CONFIGS = ("reference", "kit", "kit-eager")
GB = 10**9


class Enough(Exception):
    """Raised from the optimizer hook once a process has made its steps."""


def recipe_of(row: str, args, work: Path, extra: tuple = ()):
    """The row's recipe as the kit trains it here: the shipped file, on the prepared base and images."""
    sys.path.insert(0, str(REPO))
    from amused_tune.cli.args import parse_recipe

    base = "tiny" if args.tiny else ("512" if "512" in row else "256")
    folder, _, kit = side_by_side.prepare(work, args.images, base)
    overrides = [f"--model.base={folder}", "--data.card=null", "--data.source=imagefolder", f"--data.path={kit}",
                 "--data.prompt=null", f"--data.cache_dir={work / 'cache'}", "--validation.prompts=[]",
                 "--train.checkpoint_every=1000000", f"--train.max_steps={args.run_steps}", "--train.resume=none",
                 "--output.loss_plot=false", "--output.push_to_hub=false", "--output.tensorboard=false"]
    if args.tiny:
        overrides += ["--model.resolution=null", "--model.dtype=fp32", "--train.precision=fp32", "--train.device=cpu"]
    recipe, _, _ = parse_recipe([str(REPO / "recipes" / f"{row}.yaml"), *overrides, *extra])
    return recipe


def reference_argv(row: str, args, work: Path, out: Path) -> list[str]:
    """train_amused.py's arguments for the row (from the recipe: batch, accumulation, lr, LoRA, 8-bit Adam)."""
    r = recipe_of(row, args, work)
    base = "tiny" if args.tiny else ("512" if "512" in row else "256")
    folder, plain, _ = side_by_side.prepare(work, args.images, base)
    resolution = 32 if args.tiny else r.model.resolution or int(base)
    argv = [args.reference, "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(plain),
            "--resolution", str(resolution), "--train_batch_size", str(r.train.batch_size),
            "--gradient_accumulation_steps", str(r.train.grad_accum), "--max_train_steps", str(args.run_steps),
            "--learning_rate", str(r.optim.lr), "--mixed_precision", "no" if args.tiny else args.reference_precision,
            "--output_dir", str(out), "--checkpointing_steps", "1000000", "--validation_steps", "1000000",
            "--report_to", "comet_ml", "--cond_dropout_prob", "0.0", "--max_grad_norm", "1.0", "--seed", "0",
            "--logging_steps", "1"]
    if r.adapter.kind == "lora":
        argv += ["--use_lora", "--lora_r", str(r.adapter.rank), "--lora_alpha", str(int(r.adapter.alpha))]
    if r.optim.resolved_name == "adamw8bit":
        argv += ["--use_8bit_adam"]
    return argv


def steps_wanted(config: str, args) -> int:
    """Optimizer steps a process makes: one untimed (lazy set-up) and --timed; with auto, the eager steps it
    times and the compiling step come first."""
    if config == "kit" and not args.tiny:
        from amused_tune.train.compiling import EAGER_STEPS

        return EAGER_STEPS + 1 + args.timed
    return 1 + args.timed


def worker(args) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        torch.set_num_threads(1)
    stamps: list[float] = []
    wanted = steps_wanted(args.worker, args)

    def stamp(optimizer, a, k):  # every optimizer's step (torch's AdamW, bitsandbytes' 8-bit AdamW)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) > wanted:
            raise Enough

    register_optimizer_step_post_hook(stamp)
    work = Path(args.work)
    out = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=work))
    try:
        if args.worker == "reference":
            import runpy

            side_by_side.torchvision_shim()
            sys.argv = reference_argv(args.row, args, work, out)
            runpy.run_path(args.reference, run_name="__main__")
        else:
            from amused_tune.train.loop import train

            extra = ("--train.compile=false",) if args.worker == "kit-eager" else ()
            recipe = recipe_of(args.row, args, work, (f"--output.dir={out}", *extra))
            train(recipe)
    except Enough:
        pass
    result = {"step_s": [b - a for a, b in zip(stamps, stamps[1:])],
              "peak_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
              "reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else None}
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["compile_s"] = next((r["compile_s"] for r in rows if "compile_s" in r), None)
    Path(args.result).write_text(json.dumps(result) + "\n")


def run_one(row: str, config: str, args, work: Path) -> dict:
    result = work / f"result-{row}-{config}-{time.time_ns()}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    if args.tiny:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--worker", config, "--row", row, "--work", str(work), "--result", str(result),
           "--reference", str(args.reference), "--timed", str(args.timed), "--run-steps", str(args.run_steps),
           "--images", str(args.images), "--reference-precision", args.reference_precision]
    cmd += ["--tiny"] if args.tiny else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not result.is_file():
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(result.read_text())


def predicted_gb(row: str, args, work: Path) -> float | None:
    from amused_tune.memory import estimate as memory

    try:
        return memory.estimate(recipe_of(row, args, work)).peak_gb
    except memory.EstimateError:
        return None


def summarise(results: dict) -> dict:
    out = {}
    for row, configs in results["runs"].items():
        s = {}
        for config, runs in configs.items():
            ok = [r for r in runs if "error" not in r]
            timed = [x for r in ok for x in r["step_s"][-results["timed"]:]]
            s[config] = {"step_s": statistics.median(timed) if timed else None, "steps_timed": len(timed),
                         "peak_gb": max((r["peak_gb"] for r in ok if r["peak_gb"] is not None), default=None),
                         "reserved_gb": max((r["reserved_gb"] for r in ok if r["reserved_gb"] is not None),
                                            default=None),
                         "compile_s": next((r.get("compile_s") for r in ok if r.get("compile_s")), None),
                         "errors": [r["error"] for r in runs if "error" in r]}
        ref, kit = s.get("reference", {}), s.get("kit", {})
        pred = results["predicted_gb"].get(row)
        s["x_reference"] = (ref["step_s"] / kit["step_s"]) if ref.get("step_s") and kit.get("step_s") else None
        s["peak_vs_predicted"] = (kit["peak_gb"] / pred) if kit.get("peak_gb") and pred else None
        out[row] = s
    return out


def fmt(value, spec=".2f") -> str:
    return "—" if value is None else format(value, spec)


def table(results: dict) -> str:
    s = results["summary"]
    lines = [f"{results['device']}; {results['timed']} timed steps per process, {results['rounds']} rounds; "
             f"reference precision {results['reference_precision']}",
             "", "| recipe | reference s/step | kit s/step | kit-eager s/step | x reference | kit compile s | "
             "reference peak GB | kit peak GB | predicted GB | peak / predicted |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in s.items():
        ref, kit, eager = r.get("reference", {}), r.get("kit", {}), r.get("kit-eager", {})
        lines.append(f"| `{row}` | {fmt(ref.get('step_s'), '.3f')} | {fmt(kit.get('step_s'), '.3f')} | "
                     f"{fmt(eager.get('step_s'), '.3f')} | {fmt(r['x_reference'])} | {fmt(kit.get('compile_s'), '.0f')} | "
                     f"{fmt(ref.get('peak_gb'))} | {fmt(kit.get('peak_gb'))} | "
                     f"{fmt(results['predicted_gb'].get(row))} | {fmt(r['peak_vs_predicted'])} |")
    errors = [f"{row} {c}: {e}" for row, r in s.items() for c, v in r.items() if isinstance(v, dict)
              for e in v.get("errors", [])]
    return "\n".join(lines + ([""] + ["errors:"] + errors if errors else []))


def apply_measurements(files: list[Path], out: Path) -> int:
    """Each recipe's `# measured:` header (bench/train.py's format and writer) and the README's recipes table
    (bench/memory_table.py, which reads those headers), from the results of GPU runs (one file per row or more)."""
    import importlib.util

    loaded = [json.loads(Path(f).read_text()) for f in files]
    if not loaded or any(r["device"] == "CPU (tiny model)" for r in loaded):
        print("the measured column takes GPU results only: nothing written", file=sys.stderr)
        return 2
    results = {"device": loaded[0]["device"], "date": loaded[0]["date"],
               "summary": {row: r for f in loaded for row, r in f["summary"].items()}}
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    rows = [{"lever": None, "recipe": row, "peak_gb": r["kit"]["peak_gb"], "reserved_gb": r["kit"]["reserved_gb"],
             "step_s": r["kit"]["step_s"], "recipe_row": {"file": str(REPO / "recipes" / f"{row}.yaml")}}
            for row, r in results["summary"].items() if r.get("kit", {}).get("peak_gb") is not None]
    measured = out / "measured-from-gpu-side-by-side.json"
    measured.write_text(json.dumps({"device_type": "cuda", "device": results["device"], "date": results["date"],
                                    "rows": rows}, indent=1) + "\n")
    bench_train.update_recipes(measured)
    spec = importlib.util.spec_from_file_location("memory_table", REPO / "bench" / "memory_table.py")
    memory_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_table)
    memory_table.main([])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="path to diffusers' examples/amused/train_amused.py")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=2, help="turns each configuration takes (order reversed every other)")
    p.add_argument("--timed", type=int, default=4, help="timed optimizer steps per process")
    p.add_argument("--run-steps", type=int, default=1000,
                   help="train.max_steps the runs are set up for (what train.compile=auto decides on)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--reference-precision", default="fp16", choices=["fp16", "bf16", "no"])
    p.add_argument("--tiny", action="store_true", help="the kit's tiny model on the CPU (checks this script)")
    p.add_argument("--write-from", nargs="+", metavar="JSON",
                   help="write each recipe's measured header and the README table from these GPU results, then stop")
    p.add_argument("--name", default="gpu_side_by_side", help="results file name (OUT/NAME.json, .txt, .md)")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_from:
        return apply_measurements([Path(f) for f in args.write_from], Path(args.out))
    if not Path(args.reference or "").is_file():
        raise SystemExit(f"--reference {args.reference}: no such file (diffusers' examples/amused/train_amused.py)")
    if args.worker:
        worker(args)
        return 0
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA GPU here: run on the GPU machine, or pass --tiny to check the script on the CPU")
    work = Path(args.work or tempfile.mkdtemp(prefix="amused-gpu-side-by-side-"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name() if cuda else
               "CPU (tiny model)", "timed": args.timed, "rounds": args.rounds,
               "reference_precision": "no" if args.tiny else args.reference_precision, "load_before": os.getloadavg(),
               "command": "python bench/gpu_side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "predicted_gb": {row: predicted_gb(row, args, work) for row in args.rows}, "runs": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        for round_ in range(args.rounds):
            for config in (args.configs if round_ % 2 == 0 else args.configs[::-1]):
                run = run_one(row, config, args, work)
                results["runs"].setdefault(row, {}).setdefault(config, []).append(run)
                print(f"[{time.strftime('%H:%M:%S')}] {row} round {round_ + 1} {config}: "
                      + (run.get("error") or " ".join(f"{s:.3f}" for s in run["step_s"]) + " s/step, peak "
                         + fmt(run["peak_gb"]) + " GB"), flush=True)
                results["summary"] = summarise(results)
                results["load_after"] = os.getloadavg()
                (out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (out / f"{args.name}.txt").write_text(f"{results['command']}\n{results['date']}\n\n{text}\n")
    (out / f"{args.name}.md").write_text(text + "\n")
    print(text)
    failed = any(v.get("errors") for r in results["summary"].values() for v in r.values() if isinstance(v, dict))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
