"""What a GPU run relies on, checked on one: bf16 and fp16 training steps (fp16 with a NaN step skipped by the loss
scaler), a bf16 run from the cache against the same run without it, train.compile on and off, TensorBoard events.

    python bench/gpu_smoke.py --out bench/results            # on a CUDA GPU: real-size amused-256, random weights
    python bench/gpu_smoke.py --out /tmp/smoke --cpu-smoke   # the same checks on the CPU with the tiny model

Each check runs on its own (one failing does not stop the others) and adds its row to OUT/gpu_smoke.json as it
ends; the last line printed says how many passed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amused_tune.model.bases import build_real_size, build_tiny  # noqa: E402
from amused_tune.recipe import (AdapterConfig, DataConfig, ModelConfig, OptimConfig, OutputConfig, Recipe,  # noqa: E402
                                TrainConfig, ValidationConfig)
from amused_tune.train import loop, outputs, step as train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import shared_copy  # noqa: E402  (bench/train.py: a structural copy over the same CPU weights)


def images(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size + 32, size), Image.Resampling.BICUBIC).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a synthetic picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


class Smoke:
    def __init__(self, args):
        self.args, self.cpu = args, args.cpu_smoke
        self.work = Path(tempfile.mkdtemp(prefix="amused-gpu-smoke-"))
        self.size = 32 if self.cpu else 256
        self.data = images(self.work / "data", 4, self.size + 16)
        self.base = None if self.cpu else build_real_size(256)
        self.rows: list[dict] = []

    def recipe(self, name: str, **sections) -> Recipe:
        r = Recipe(
            model=ModelConfig(base="tiny" if self.cpu else "amused/amused-256", dtype="fp32"),
            data=DataConfig(source="imagefolder", path=str(self.data), cache=False, center_crop=True,
                            random_flip=False, cache_dir=str(self.work / "cache")),
            adapter=AdapterConfig(kind="lora", rank=16 if not self.cpu else 4, alpha=32.0 if not self.cpu else 8.0),
            optim=OptimConfig(lr=1e-4),
            train=TrainConfig(batch_size=1, grad_accum=1, max_steps=3, precision="fp32", checkpoint_every=10**6,
                              cond_dropout=0.0, device="cpu" if self.cpu else None),
            validation=ValidationConfig(prompts=[]),
            output=OutputConfig(dir=str(self.work / name), loss_plot=False),
        )
        for section, values in sections.items():
            for key, value in values.items():
                setattr(getattr(r, section), key, value)
        return r

    def train(self, recipe: Recipe) -> list[dict]:
        reset_accelerate()
        components = build_tiny() if self.cpu else shared_copy(self.base)
        loop.train(recipe, components=components)
        return outputs.read_metrics(Path(recipe.output.dir) / "metrics.jsonl")

    def check(self, name: str, fn) -> None:
        started = time.perf_counter()
        row = {"check": name}
        try:
            row.update(fn())
            row.setdefault("ok", True)
        except Exception as err:
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:500])
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - started, 1)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_smoke.json").write_text(json.dumps({"device": device_name(), "rows": self.rows}, indent=1) + "\n")

    # ----------------------------------------------------------------------------------------- the checks

    def bf16_steps(self) -> dict:
        rows = self.train(self.recipe("bf16", model={"dtype": "bf16"}, train={"precision": "bf16"}))
        losses = [r["loss"] for r in rows]
        return {"ok": len(losses) == 3 and all(np.isfinite(losses)), "losses": losses,
                "step_s": [r["step_s"] for r in rows]}

    def fp16_skip_nonfinite(self) -> dict:
        original, calls = train_step.compute_loss, {"n": 0}

        def nan_at_step_2(*args, **kwargs):
            calls["n"] += 1
            loss = original(*args, **kwargs)
            return loss * float("nan") if calls["n"] == 2 else loss

        train_step.compute_loss = nan_at_step_2
        try:
            recipe = self.recipe("fp16", model={"dtype": "fp16"}, train={"precision": "fp16", "skip_nonfinite": True,
                                                                        "max_steps": 4})
            if self.cpu:  # no fp16 autocast on a CPU (it would be refused as two half precisions)
                recipe.model.dtype, recipe.train.precision = "bf16", "bf16"
            rows = self.train(recipe)
        finally:
            train_step.compute_loss = original
        return {"ok": len(rows) == 4 and rows[1]["loss"] is None and rows[-1]["skipped_nonfinite"] == 1
                and all(r["loss"] is not None for r in rows[2:]) and (self.cpu or rows[1].get("scaler_skipped") == 1),
                "losses": [r["loss"] for r in rows], "loss_scale": [r.get("loss_scale") for r in rows],
                "scaler_skipped": [r.get("scaler_skipped") for r in rows]}

    def bf16_cached_vs_uncached(self) -> dict:
        common = {"model": {"dtype": "bf16"}, "train": {"precision": "bf16", "max_steps": 3}}
        uncached = [r["loss"] for r in self.train(self.recipe("uncached", **common))]
        cached = [r["loss"] for r in self.train(self.recipe("cached", data={"cache": True}, **common))]
        rel = [abs(a - b) / abs(b) for a, b in zip(cached, uncached)]
        return {"ok": max(rel) <= 2e-3, "cached": cached, "uncached": uncached, "max_relative_diff": max(rel)}

    def compile_on_off(self) -> dict:
        result = {}
        steps = 3 if self.cpu else 12
        for compiled in (False, True):
            started = time.perf_counter()
            rows = self.train(self.recipe(f"compile-{compiled}", model={"dtype": "bf16"},
                                          train={"precision": "bf16", "compile": compiled, "max_steps": steps},
                                          data={"cache": True}))
            result[f"compile_{compiled}"] = {
                "first_step_s": rows[0]["step_s"], "median_step_s": statistics.median(r["step_s"] for r in rows[2:]),
                "wall_s": round(time.perf_counter() - started, 1), "loss": rows[-1]["loss"]}
        off, on = result["compile_False"]["median_step_s"], result["compile_True"]["median_step_s"]
        result["speedup"] = off / on
        return result

    def tensorboard(self) -> dict:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        recipe = self.recipe("tensorboard", output={"tensorboard": True},
                             validation={"prompts": ["a red square"], "every": 2, "steps": 4})
        self.train(recipe)
        tags = {"scalars": set(), "images": set()}
        for event in (Path(recipe.output.dir) / "logs").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(event.parent), size_guidance={"images": 0, "scalars": 0}).Reload()
            tags["scalars"] |= set(acc.Tags()["scalars"])
            tags["images"] |= set(acc.Tags()["images"])
        return {"ok": {"loss", "lr"} <= tags["scalars"] and bool(tags["images"]),
                "scalars": sorted(tags["scalars"]), "images": sorted(tags["images"])}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script itself)")
    p.add_argument("--skip", nargs="*", default=[], help="checks to leave out")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_smoke.py needs a CUDA GPU; pass --cpu-smoke to check the script on the CPU")
    if args.cpu_smoke:
        torch.set_num_threads(1)
    smoke = Smoke(args)
    checks = {"bf16_steps": smoke.bf16_steps, "fp16_skip_nonfinite": smoke.fp16_skip_nonfinite,
              "bf16_cached_vs_uncached": smoke.bf16_cached_vs_uncached, "tensorboard": smoke.tensorboard,
              "compile_on_off": smoke.compile_on_off}
    if args.cpu_smoke:  # compiling on a CPU takes minutes: the smoke run leaves it out
        checks.pop("compile_on_off")
    for name, fn in checks.items():
        if name not in args.skip:
            smoke.check(name, fn)
    passed = sum(r["ok"] for r in smoke.rows)
    print(f"gpu_smoke: {passed}/{len(smoke.rows)} checks passed on {device_name()}", flush=True)
    return 0 if passed == len(smoke.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
