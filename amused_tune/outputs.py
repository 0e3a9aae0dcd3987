"""What a run writes: the output folder's guard, recipe.yaml, metrics.jsonl, the final weights and the loss plot."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import yaml

from amused_tune import adapters
from amused_tune.recipe import Recipe, RecipeError

# keys that may change between a run and its resumption without making it a different run
RESUMABLE_CHANGES = {
    ("train", "max_steps"), ("train", "resume"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
    ("train", "log_every"), ("train", "device"), ("data", "num_workers"), ("validation", None), ("output", None),
}
VERSIONED = ("amused-tune", "torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of everything that defines the run (not its length, logging or outputs)."""
    d = recipe.to_dict()
    for section, key in RESUMABLE_CHANGES:
        if key is None:
            d.pop(section, None)
        else:
            d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def recipe_yaml(recipe: Recipe) -> str:
    header = "# resolved recipe written by amused-tune; resume or rerun with: amused-tune THIS_FILE\n"
    header += "".join(f"# {k}=={v}\n" for k, v in package_versions().items())
    header += f"# fingerprint: {recipe_fingerprint(recipe)}\n"
    return header + yaml.safe_dump(json.loads(json.dumps(recipe.to_dict())), sort_keys=False)


def prepare_output_dir(out: Path, recipe: Recipe, main: bool) -> None:
    """Create the output folder; refuse one that holds another recipe's run unless output.overwrite."""
    saved = out / "recipe.yaml"
    if saved.is_file() and recipe.train.resume != "none":
        previous = _fingerprint_in(saved)
        if previous and previous != recipe_fingerprint(recipe):
            if not recipe.output.overwrite:
                raise RecipeError(
                    f"output.dir={out} holds a run of a different recipe: pick another output.dir, "
                    "or pass --output.overwrite=true to discard its checkpoints"
                )
            if main:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                (out / "metrics.jsonl").unlink(missing_ok=True)
    if not main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".recipe.yaml.tmp"
        tmp.write_text(recipe_yaml(recipe))
        os.replace(tmp, saved)
    except OSError as err:
        raise RecipeError(f"output.dir={out} is not writable ({err.strerror}): pick another output.dir") from err


def _fingerprint_in(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if line.startswith("# fingerprint: "):
            return line.split(": ", 1)[1].strip()
    return None


class MetricsFile:
    """metrics.jsonl, one JSON object per logged step; a resumed run first drops rows past its checkpoint."""

    def __init__(self, path: Path, resumed_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_loss_plot(metrics: Path, png: Path) -> Path | None:
    rows = [r for r in read_metrics(metrics) if "lr" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_final(out: Path, recipe: Recipe, transformer, comps) -> dict:
    """The run's deliverables: the adapter (both formats) or the full U-ViT, and the loss plot."""
    written = {}
    if recipe.adapter.kind == "lora":
        text_encoder = comps.text_encoder if recipe.adapter.text_encoder else None
        adapters.save_lora(out / "adapter", transformer, text_encoder, base_model=recipe.model.base)
        written["adapter"] = str(out / "adapter")
    else:
        transformer.save_pretrained(out / "transformer")
        written["transformer"] = str(out / "transformer")
    if recipe.output.loss_plot:
        plot = write_loss_plot(out / "metrics.jsonl", out / "loss.png")
        if plot:
            written["loss_plot"] = str(plot)
    return written
