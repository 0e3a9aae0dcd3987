"""What a training run tells the person who started it, on stdout (main process only).

`loading` before the base model loads; `banner` once the data is ready: the base, what trains, how many images,
steps, the effective batch and the output folder; `finished` at the end: the final loss smoothed over the last steps
(one step's loss is noisy) and a `next:` line with the command that samples from the run.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from amused_tune.recipe import Recipe


def say(message: str) -> None:
    """One line on stdout, from the main process only (launched processes all run the same code)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def loading(recipe: Recipe) -> None:
    say(f"loading base model {recipe.model.base} ...")


def what_trains(recipe: Recipe) -> str:
    a = recipe.adapter
    if a.kind == "full":
        return "full fine-tune of the U-ViT"
    text = f"LoRA rank {a.rank} (alpha {a.alpha:g}) on {', '.join(a.targets)}"
    return text + (" and the text encoder" if a.text_encoder else "")


def banner(recipe: Recipe, out: Path, processes: int = 1) -> None:
    """The run in one line: base | what trains | images | steps | effective batch | output folder."""
    report = Path(out) / "data_report.json"
    images = json.loads(report.read_text()).get("used") if report.is_file() else None
    t = recipe.train
    batch = t.batch_size * t.grad_accum * processes
    say(f"train: base {recipe.model.base} | {what_trains(recipe)} | "
        f"{_plural(images, 'image') if images is not None else 'images: see data_report.json'} | "
        f"{_plural(t.max_steps, 'step')} | effective batch {batch} ({t.batch_size} x {t.grad_accum} accumulated x "
        f"{_plural(processes, 'process')}) | output {out}")


def sample_prompt(recipe: dict) -> str:
    prompts = (recipe.get("validation") or {}).get("prompts") or []
    if isinstance(prompts, str):
        prompts = [prompts]
    return prompts[0] if prompts else (recipe.get("data") or {}).get("prompt") or "a photo"


def next_command(out: Path, recipe: dict) -> str:
    """The command that samples from a finished run (a full fine-tune is merged into a pipeline folder first)."""
    base = str((recipe.get("model") or {}).get("base") or "amused/amused-256")
    prompt = shlex.quote(sample_prompt(recipe))
    target = shlex.quote(str(Path(out) / "sampled"))
    if (recipe.get("adapter") or {}).get("kind") == "full":
        merged = shlex.quote(f"{out}-merged")
        return (f"amused-tune merge {shlex.quote(str(out))} --out {merged} && "
                f"amused-tune sample --base {merged} --prompt {prompt} --out {target}")
    return (f"amused-tune sample --base {shlex.quote(base)} --adapter {shlex.quote(str(out))} "
            f"--prompt {prompt} --out {target}")


def finished(summary: dict) -> None:
    """The `done:` line (the loss as the mean of the last steps) and the `next:` line."""
    from amused_tune.share.card import final_metrics

    out = Path(summary["output_dir"])
    final = final_metrics(out)
    if final:
        loss = f"loss {final['loss_mean']:.4f} (mean of the last {_plural(final['mean_of'], 'step')})"
    else:
        loss = f"loss {summary['loss']:.4f}"
    say(f"done: step {summary['step']}, {loss}, outputs in {out}")
    recipe_file = out / "recipe.yaml"
    if recipe_file.is_file():
        import yaml

        say(f"next: {next_command(out, yaml.safe_load(recipe_file.read_text()) or {})}")
