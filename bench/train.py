"""Peak memory and speed of every shipped recipe (and of each low-VRAM lever), measured with the kit's trainer.

    python bench/train.py                        # GPU: random-weight real-size amused-256/512, all recipes
    python bench/train.py --only nouns_256_lora  # a subset (regular expression on the config name)
    python bench/train.py --tiny --steps 1       # CPU smoke run on the tiny model
    python bench/train.py --update-recipes bench/results/train-<gpu>.json   # write `# measured:` headers

Every recipe with a `# paper:` header (the report's tables and StyleDrop) runs through
`amused_tune.train.loop.train(recipe, components=...)`, as `amused-tune RECIPE.yaml` would, for --warmup + --steps
optimizer steps on synthetic images (random pictures written to a temporary imagefolder that replaces the recipe's
data card). The report's bs 1 LoRA recipes also run once per low-VRAM lever (LEVERS). Each base is built once
(`build_real_size`, no download; weights do not change memory or speed) and shared by the configs through a
structural copy over the same CPU weights. All configs run in this process, memory freed and peak statistics
reset between them; a failing config is reported and the others go on.

Reported per config: the paper's peak, the reference trainer's (diffusers' train_amused.py on an H100, where a
row exists: bench/reference_h100.yaml), the memory estimator's prediction beside what is measured (`pred GB` the run's
peak, `pred prep` its cache-building moment; `amused-tune RECIPE.yaml --estimate`), the kit's peak
(torch.cuda.max_memory_allocated over the whole run, split into the training steps and the data preparation, and
reserved; GB are 10^9 bytes), the median seconds per optimizer step after the warmup, and images/s.
Checkpoints and final weights are not written (--save writes them): the steps are what is measured. Writes
OUT/train-<device>.json (after every config, so a killed run keeps what it measured) and OUT/train-<device>.png
(measured vs paper vs reference memory). See docs/recipes.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amused_tune.cli import recipes as recipes_cli  # noqa: E402
from amused_tune.cli.args import parse_recipe  # noqa: E402
from amused_tune.train import checkpoints, outputs  # noqa: E402
from amused_tune.train import loop as trainer  # noqa: E402
from amused_tune.model.bases import build_real_size, build_tiny  # noqa: E402

# The reference to beat: diffusers' examples/amused/train_amused.py measured on one H100 (bench/reference_h100.yaml,
# which says how). Its GB are 10^9 bytes, as the kit's predictions (amused_tune.memory.estimate) and this bench's figures.
REFERENCE_FILE = Path(__file__).resolve().parent / "reference_h100.yaml"
GB = 10**9
CARDS = {"amused-256": "nouns_256", "amused-512": "minecraft_512"}

# Low-VRAM levers, one at a time on top of the bs 1 LoRA recipes (which already hold the base in bf16 and
# train from the cache): each entry is (suffix, overrides, needs CUDA).
LEVERS = [
    ("fp32-base", ["--model.dtype=fp32"], False),  # the bf16-base lever switched off
    ("no-cache", ["--data.cache=false"], False),  # the cache lever switched off
    ("grad-ckpt", ["--train.grad_checkpointing=true"], False),
    ("compile", ["--train.compile=true"], True),  # torch.compile of the U-ViT (minutes to compile on a CPU)
    ("8bit-base", ["--model.quantize=8bit"], True),
    ("4bit-base", ["--model.quantize=4bit"], True),
    ("all-levers", ["--train.grad_checkpointing=true", "--model.quantize=4bit"], True),
]


def reference() -> dict[str, dict]:
    """Recipe name -> the reference trainer's {peak_gb, reserved_gb, step_s}."""
    import yaml

    out = {}
    for base, rows in yaml.safe_load(REFERENCE_FILE.read_text())["trainer"].items():
        for key, row in rows.items():
            mode, bs, ga = re.fullmatch(r"(\w+?)_bs(\d+)_ga(\d+)", key).groups()
            out[f"{CARDS[base]}_{mode}_bs{bs}x{ga}"] = {k: row[k] for k in ("peak_gb", "reserved_gb", "step_s")}
    return out


def predicted(recipe) -> dict:
    """The memory estimator's peak and its cache-building moment for a recipe (GB), None on the tiny model."""
    from amused_tune.memory import estimate as memory
    try:
        est = memory.estimate(recipe)
    except memory.EstimateError:
        return {"predicted_gb": None, "predicted_prep_gb": None}
    prep = est.at(memory.ENCODING) / GB if memory.ENCODING in est.moments else None
    return {"predicted_gb": est.peak_gb, "predicted_prep_gb": prep}


@dataclass
class Config:
    name: str
    recipe: dict  # the recipes_cli row of the recipe it runs
    overrides: list[str] = field(default_factory=list)
    lever: str | None = None
    needs_cuda: bool = False


LEVER_RECIPES = r"^(nouns_256_lora_bs1x16|minecraft_512_lora_bs1x8)$"  # the report's bs 1 LoRA rows


def configs(rows: list[dict], levers: bool, lever_recipes: str = LEVER_RECIPES) -> list[Config]:
    """Every paper recipe, then the levers on each bs 1 LoRA recipe named by `lever_recipes` (a regex)."""
    paper = [r for r in rows if r["paper_memory_gb"] is not None]
    out = [Config(r["name"], r) for r in paper]
    if levers:
        for r in paper:
            if r["adapter_kind"] == "lora" and r["batch_size"] == 1 and re.search(lever_recipes, r["name"]):
                out += [Config(f"{r['name']}+{s}", r, list(o), s, cuda) for s, o, cuda in LEVERS]
    return out


def synthetic_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n smooth random RGB pictures of size x size with captions, as an imagefolder (metadata.jsonl)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        small.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a synthetic picture number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def without_saving(enabled: bool):
    """Skip checkpoints and final weights (full fine-tuning writes GBs per config), restoring them after."""
    if not enabled:
        yield
        return
    save, write_final = checkpoints.save, outputs.write_final
    checkpoints.save = lambda *args, **kwargs: None
    outputs.write_final = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        checkpoints.save, outputs.write_final = save, write_final


@contextlib.contextmanager
def data_prep_peak(record: dict, enabled: bool):
    """Record the GPU peak of the trainer's data preparation (cache encoding) in record["prep_gb"], then reset the
    peak statistics, so that max_memory_allocated at the end is the peak of the training steps alone."""
    original = getattr(trainer, "prepare_training_data", None)
    if original is None or not enabled:
        yield
        return

    def measured(*args, **kwargs):
        result = original(*args, **kwargs)
        torch.cuda.synchronize()
        record["prep_gb"] = torch.cuda.max_memory_allocated() / GB
        record["prep_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
        torch.cuda.reset_peak_memory_stats()
        return result

    trainer.prepare_training_data = measured
    try:
        yield
    finally:
        trainer.prepare_training_data = original


@contextlib.contextmanager
def environment(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_config(cfg: Config, comps, args, work: Path, data: Path) -> dict:
    """Train one config for warmup + steps optimizer steps; its row of the table."""
    r = cfg.recipe
    out_dir = work / "runs" / cfg.name.replace("+", "__")
    overrides = [
        f"--output.dir={out_dir}", f"--train.max_steps={args.warmup + args.steps}", "--train.resume=none",
        "--train.checkpoint_every=1000000", "--train.log_every=1", "--validation.prompts=[]",
        "--output.loss_plot=false", "--output.push_to_hub=false", "--output.tensorboard=false",
        "--data.card=null", "--data.source=imagefolder", f"--data.path={data}", "--data.prompt=null",
    ]
    if args.tiny:  # CPU smoke run: tiny model, fp32 everywhere (bf16 autocast on a CPU is slow)
        overrides += ["--model.base=tiny", "--model.resolution=null", "--model.dtype=fp32",
                      "--train.precision=fp32", "--train.device=cpu"]
    recipe, _, _ = parse_recipe([r["file"], *overrides, *cfg.overrides])
    row = {"config": cfg.name, "recipe": r["name"], "lever": cfg.lever, "base": r["base"],
           "batch_size": recipe.train.batch_size, "grad_accum": recipe.train.grad_accum,
           "paper_gb": r["paper_memory_gb"], **predicted(recipe)}
    free_memory()
    before = torch.cuda.memory_allocated() / GB if args.cuda else 0.0
    started = time.perf_counter()
    phases: dict = {}
    with data_prep_peak(phases, args.cuda):
        trainer.train(recipe, components=comps)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "step_s" in m]
    timed = steps[args.warmup:] or steps
    step_s = statistics.median(m["step_s"] for m in timed)
    row.update(
        step_s=step_s,
        images_per_s=recipe.train.batch_size * recipe.train.grad_accum / step_s,
        trainer_peak_gb=max(m["peak_mem_gb"] for m in steps),
        loss=steps[-1]["loss"],
        wall_s=wall,
        leftover_gb_before=before,
    )
    if args.cuda:  # peak_gb: the whole run; steps_gb: the training steps; prep_gb: data prep
        row["steps_gb"] = torch.cuda.max_memory_allocated() / GB
        row["prep_gb"] = phases.get("prep_gb")
        row["peak_gb"] = max(row["steps_gb"], row["prep_gb"] or 0.0)
        row["reserved_gb"] = max(torch.cuda.max_memory_reserved() / GB, phases.get("prep_reserved_gb") or 0.0)
    else:  # process peak RSS, as the trainer logs on a CPU: not comparable across configs
        row["peak_gb"], row["reserved_gb"] = row["trainer_peak_gb"], None
    return row


def compare(row: dict, ref: dict[str, dict]) -> dict:
    """Add the reference trainer's figures and the targets (below paper and reference, speedup)."""
    rr = ref.get(row["recipe"]) if row.get("lever") is None else None
    row["ref_gb"] = rr["peak_gb"] if rr else None
    row["ref_step_s"] = rr["step_s"] if rr else None
    if "peak_gb" in row and row.get("device") == "cuda":
        row["below_paper"] = row["paper_gb"] is not None and row["peak_gb"] < row["paper_gb"]
        row["below_ref"] = None if rr is None else row["peak_gb"] < rr["peak_gb"]
        row["speedup_vs_ref"] = None if rr is None else rr["step_s"] / row["step_s"]
    return row


def fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def table(rows: list[dict]) -> str:
    head = ["config", "paper GB", "ref GB", "pred GB", "steps GB", "pred prep", "prep GB", "peak GB", "reserved GB",
            "s/step", "img/s",
            "ref s/step", "x ref", "status"]
    body = []
    for r in rows:
        status = r.get("error") or r.get("skipped") or "ok"
        gb = [fmt(r.get(k)) for k in ("paper_gb", "ref_gb", "predicted_gb", "steps_gb", "predicted_prep_gb", "prep_gb",
                                      "peak_gb", "reserved_gb")]
        speed = [fmt(r.get("step_s"), ".3f"), fmt(r.get("images_per_s"), ".1f"), fmt(r.get("ref_step_s"), ".3f"),
                 fmt(r.get("speedup_vs_ref"))]
        body.append([r["config"], *gb, *speed, status[:60]])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def readme_table(rows: list[dict], device: str) -> str:
    """The README's recipe table: one line per paper recipe (levers left out)."""
    lines = [f"| recipe | base | mode | batch x accum | lr | paper GB | measured GB ({device}) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("lever") is not None:
            continue
        rec = r["recipe_row"]
        lines.append(f"| `{r['recipe']}` | {rec['base']} | {recipes_cli.mode(rec)} | {rec['batch_size']} x "
                     f"{rec['grad_accum']} | {rec['lr']:.1e} | {fmt(r.get('paper_gb'), 'g')} | "
                     f"{fmt(r.get('peak_gb')) if r.get('device') == 'cuda' else '—'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    ok = [r for r in rows if "step_s" in r and r.get("device") == "cuda"]
    if not ok:
        return ""
    paper = [r for r in ok if r.get("lever") is None]
    lines = [f"below the paper's peak: {sum(bool(r.get('below_paper')) for r in paper)}/{len(paper)}"]
    with_ref = [r for r in paper if r.get("ref_gb") is not None]
    if with_ref:
        lines.append(f"below the reference trainer's peak: {sum(bool(r['below_ref']) for r in with_ref)}/"
                     f"{len(with_ref)}; >= 2x faster per step: "
                     f"{sum(r['speedup_vs_ref'] >= 2 for r in with_ref)}/{len(with_ref)}")
    lora1 = [r for r in ok if r["recipe_row"]["adapter_kind"] == "lora" and r["batch_size"] == 1]
    if lora1:
        best = min(lora1, key=lambda r: r["peak_gb"])
        lines.append(f"LoRA bs 1 lowest peak: {best['peak_gb']:.2f} GB ({best['config']}); target < 3 GB")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("peak_gb") is not None]
    if not rows:
        return
    names = [r["config"] for r in rows]
    series = [("paper (A100)", "paper_gb", "#bbbbbb"), ("reference trainer (H100)", "ref_gb", "#e69f00"),
              (f"amused-tune ({device})", "peak_gb", "#0072b2")]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) * 3 / 2 + 1.5))
    height = 0.27
    for k, (label, key, colour) in enumerate(series):
        ys = [i + (k - 1) * height for i in range(len(rows))]
        ax.barh(ys, [r.get(key) or 0 for r in rows], height=height, label=label, color=colour)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("peak training memory, GB (max_memory_allocated)" if rows[0].get("device") == "cuda"
                  else "process peak RSS, GB (CPU smoke run: not comparable with the GPU figures)")
    ax.set_title("aMUSEd fine-tuning recipes: measured vs paper memory")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_recipes(results: Path) -> int:
    """Rewrite the `# measured:` header line of each recipe from a results JSON of a GPU run."""
    data = json.loads(results.read_text())
    if data.get("device_type") != "cuda":
        print(f"{results} is not a GPU run: recipe headers unchanged", file=sys.stderr)
        return 2
    date = data.get("date", "")[:10]
    changed = 0
    for r in data["rows"]:
        if r.get("lever") is not None or r.get("peak_gb") is None:
            continue
        path = Path(r["recipe_row"]["file"])
        if not path.is_file():
            path = recipes_cli.RECIPES_DIR / f"{r['recipe']}.yaml"
        note = (f"# measured: {r['peak_gb']:.2f} GB ({data['device']}; {r['reserved_gb']:.2f} GB reserved; "
                f"{r['step_s']:.3f} s/step; bench/train.py {date})")
        text = path.read_text()
        new, n = re.subn(r"^#\s*measured:.*$", note, text, count=1, flags=re.MULTILINE)
        if n and new != text:
            path.write_text(new)
            changed += 1
    print(f"updated the measured line of {changed} recipes")
    return 0


def shared_copy(comps):
    """A copy of the components whose structure is new but whose CPU weights are the originals' storage (instant,
    where a deepcopy of a real-size base takes seconds). Safe on a GPU: the trainer moves every weight to the device
    (new tensors) before anything changes, so the originals stay untouched; new Parameter objects keep
    requires_grad and LoRA injection per copy."""
    memo = {}
    for module in (comps.transformer, comps.vqvae, comps.text_encoder):
        for p in module.parameters():
            memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        for b in module.buffers():
            memo[id(b)] = b
    return copy.deepcopy(comps, memo)


def build_bases(resolutions: set[int]) -> dict[int, object]:
    bases = {}
    for res in sorted(resolutions):
        t0 = time.perf_counter()
        bases[res] = build_real_size(res)
        print(f"built random-weight amused-{res} in {time.perf_counter() - t0:.1f} s", flush=True)
    return bases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke run)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per config")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--only", default=None, help="regular expression: run the configs whose name matches")
    p.add_argument("--no-levers", dest="levers", action="store_false", help="only the recipes, no lever runs")
    p.add_argument("--levers-on", default=LEVER_RECIPES, help="regex: the bs 1 LoRA recipes that get lever runs")
    p.add_argument("--images", type=int, default=32, help="synthetic training images")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting configs after this many seconds (the rest are reported as skipped)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and the PNG")
    p.add_argument("--save", action="store_true", help="also write checkpoints and final weights")
    p.add_argument("--update-recipes", metavar="RESULTS_JSON", help="write measured memory into recipe headers")
    args = p.parse_args(argv)
    if args.update_recipes:
        return update_recipes(Path(args.update_recipes))

    started = time.perf_counter()
    if args.tiny:
        torch.set_num_threads(1)  # the tiny model gains nothing from threads; on a shared CPU they cost a lot
    cuda = args.cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("bench/train.py measures GPU memory: run it on a CUDA GPU, or pass --tiny for a CPU smoke run")
    device = torch.cuda.get_device_name() if cuda else "CPU (tiny model)"
    rows_all, errors = recipes_cli.list_recipes()
    for message in errors:
        print(f"skipped recipe {message}", file=sys.stderr)
    todo = configs(rows_all, args.levers, args.levers_on)
    if args.only:
        todo = [c for c in todo if re.search(args.only, c.name)]
    if not todo:
        raise SystemExit("no config to run (see --only)")
    ref = reference()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny-cpu" if args.tiny else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    json_path, png_path = out / f"train-{tag}.json", out / f"train-{tag}.png"

    resolutions = {c.recipe["resolution"] or 256 for c in todo}
    results = {"device": device, "device_type": "cuda" if cuda else "cpu", "date": datetime.datetime.now().isoformat(),
               "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup, "images": args.images,
               "rows": []}
    with tempfile.TemporaryDirectory(prefix="amused-bench-") as tmp, without_saving(not args.save), \
            environment(AMUSED_TUNE_CACHE=str(Path(tmp) / "cache")):
        work = Path(tmp)
        data = {res: synthetic_images(work / f"images-{res}", args.images, 40 if args.tiny else max(320, res + 64))
                for res in resolutions}
        bases = {} if args.tiny else build_bases(resolutions)
        for cfg in todo:
            res = cfg.recipe["resolution"] or 256
            row = {"config": cfg.name, "recipe": cfg.recipe["name"], "lever": cfg.lever, "base": cfg.recipe["base"],
                   "batch_size": cfg.recipe["batch_size"], "paper_gb": cfg.recipe["paper_memory_gb"],
                   "recipe_row": cfg.recipe, "device": "cuda" if cuda else "cpu"}
            if cfg.needs_cuda and not cuda:
                row["skipped"] = "needs CUDA" + (" (compiling on a CPU takes minutes)" if cfg.lever == "compile"
                                                 else " (bitsandbytes quantization)")
            elif time.perf_counter() - started > args.budget_s:
                row["skipped"] = f"time budget ({args.budget_s:.0f} s) spent"
            else:
                # tiny: a fresh model (CPU training changes weights in place); GPU: the shared-weight copy
                comps = build_tiny() if args.tiny else shared_copy(bases[res])
                try:
                    row.update(run_config(cfg, comps, args, work, data[res]))
                except Exception as err:  # one failing config (OOM, a lever) must not lose the others
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    traceback.print_exc()
                finally:
                    del comps
                    reset_accelerate()
                    free_memory()
            results["rows"].append(compare(row, ref))
            results["elapsed_s"] = time.perf_counter() - started
            json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
            print(f"[{results['elapsed_s']:6.1f} s] {cfg.name}: "
                  + (row.get("error") or row.get("skipped") or
                     f"peak {row['peak_gb']:.2f} GB (steps {fmt(row.get('steps_gb'))}, predicted "
                     f"{fmt(row.get('predicted_gb'))}), {row['step_s']:.3f} s/step"), flush=True)

    plot(results["rows"], png_path, device)
    print()
    print(f"{device}; {args.warmup} warmup + {args.steps} timed optimizer steps per config; "
          f"{args.images} synthetic images; total {results['elapsed_s']:.0f} s")
    print(table(results["rows"]))
    if text := summary(results["rows"]):
        print(text)
    print("\nREADME recipe table:")
    print(readme_table(results["rows"], device if cuda else "not measured: no GPU"))
    print(f"\nwrote {json_path} and {png_path}")
    failed = [r for r in results["rows"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
