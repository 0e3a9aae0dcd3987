"""What a run writes: the output folder's guard, recipe.yaml, metrics.jsonl, the final weights and the loss plot."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from amused_tune.model import adapters
from amused_tune.common import METRICS_FILE, RECIPE_FILE, read_jsonl
from amused_tune.model.provenance import run_record, write_record
from amused_tune.recipe import Recipe, RecipeError
from amused_tune.share import hub
from amused_tune.train import checkpoints
from amused_tune.train.identity import recipe_fingerprint, recipe_yaml
from amused_tune.train.validation import pixel_art_settings
from amused_tune.writes import WRITE_ERRNOS, as_write_error, folder_aside, write_file, write_with

# what a run writes into output.dir; `--output.overwrite=true` discards these before starting over
RUN_ARTIFACTS = ("checkpoints", METRICS_FILE, "samples", "adapter", "adapter-raw", "transformer", "loss.png", "logs",
                 "train.log")


def prepare_output_dir(out: Path, recipe: Recipe, main: bool) -> None:
    """Create the output folder and write recipe.yaml; refuse a folder that holds another run unless allowed.

    A folder holds a run once it has checkpoints, metrics or final weights. Such a folder is refused when it holds a
    run of a different recipe (by fingerprint), or when `train.resume=none` would start over on top of it, unless
    `output.overwrite=true`, which discards that run's outputs first. Only the main process writes.
    """
    previous = run_in(out)
    if previous is not None:
        fingerprint, last_step = previous
        other = fingerprint is not None and fingerprint != recipe_fingerprint(recipe)
        restart = recipe.train.resume == "none"
        if (other or restart) and not recipe.output.overwrite:
            at = f" (checkpoint at step {last_step})" if last_step else ""
            if other:
                raise RecipeError(
                    f"output.dir={out} holds a run of a different recipe{at}: pick another output.dir, or pass "
                    "--output.overwrite=true to discard that run"
                )
            raise RecipeError(
                f"output.dir={out} already holds a run{at} and train.resume=none would start it over: pass "
                "--train.resume=auto to continue it, pick another output.dir, or pass --output.overwrite=true"
            )
        where = recipe.train.resume
        if (other or restart) and where not in ("auto", "none") and _inside(Path(where), out):
            raise RecipeError(
                f"train.resume={where} is inside output.dir={out}, whose run --output.overwrite=true would discard: "
                "pick another output.dir"
            )
        if (other or restart) and main:
            for name in RUN_ARTIFACTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    if not main:
        return
    try:
        write_file(out / RECIPE_FILE, recipe_yaml(recipe), "the resolved recipe")
    except OSError as err:
        if err.errno in WRITE_ERRNOS:  # a full disk, a read-only folder: the one line of a failed write
            raise
        raise RecipeError(
            f"output.dir={out} is not writable ({err.strerror or err}): pick another output.dir"
        ) from err


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def run_in(out: Path) -> tuple[str | None, int] | None:
    """(fingerprint, newest checkpoint step) of the run held in `out`, or None when it holds none."""
    found = checkpoints.list_checkpoints(out / "checkpoints")
    metrics = out / METRICS_FILE
    has_outputs = (metrics.is_file() and metrics.stat().st_size > 0) or (out / "adapter").is_dir() or (
        out / "transformer").is_dir()
    if not found and not has_outputs:
        return None
    fingerprint = _fingerprint_in(out / RECIPE_FILE) if (out / RECIPE_FILE).is_file() else None
    if fingerprint is None and found:
        try:
            fingerprint = json.loads((found[-1] / "meta.json").read_text()).get("recipe_fingerprint")
        except (OSError, ValueError):
            pass
    return fingerprint, (checkpoints.step_of(found[-1]) if found else 0)


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
        if path.exists():  # drop the rows of steps that will be trained again; the swap is atomic
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _row_step(line) <= resumed_step]
            write_file(path, "".join(line + "\n" for line in kept), "the loss log")

    def write(self, row: dict) -> None:
        """Append one row; non-finite numbers are written as null (valid JSON). A row cut short by a full disk is
        ignored by every reader and dropped when the run resumes."""
        if self.enabled:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(clean) + "\n")
            except OSError as err:
                raise as_write_error(err, self.path, "the loss log") from err


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):  # a line cut by a kill: dropped
        return 1 << 62


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a last line cut short by a killed process is ignored)."""
    return read_jsonl(path)


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
    held = [(r["step"], r["heldout_loss"]) for r in read_metrics(metrics) if r.get("heldout_loss") is not None]
    if held:  # validation.holdout: its minimum marks the step whose weights generalise best
        best = min(held, key=lambda sl: sl[1])
        ax.plot(*zip(*held), "o-", lw=1.5, ms=3, color="black", label="held-out")
        ax.axvline(best[0], ls=":", lw=1, color="black", label=f"held-out minimum (step {best[0]})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked cross-entropy")
    ax.legend()
    fig.tight_layout()
    try:
        write_with(png, lambda tmp: fig.savefig(tmp, format="png"), "the loss plot")
    finally:
        plt.close(fig)
    return png


def final_written(out: Path, recipe: Recipe) -> bool:
    """Whether the run's final weights are in `out` (adapter/ for LoRA, transformer/ for full fine-tuning)."""
    if recipe.adapter.kind != "full":  # LoKr / LoHa: peft's format only (diffusers cannot load them)
        files = [adapters.PEFT_FILE] + ([adapters.DIFFUSERS_FILE] if recipe.adapter.kind in ("lora", "dora") else [])
        return all((out / "adapter" / f).is_file() for f in files)
    return (out / "transformer" / "config.json").is_file() and any((out / "transformer").glob("*.safetensors"))


def save_adapter(folder: Path, transformer, text_encoder=None, base_model: str | None = None,
                 record: dict | None = None, what: str = "the trained adapter") -> Path:
    """`adapters.save_lora` into a folder written aside: `folder` holds the old adapter or the new one, never half."""
    with folder_aside(folder, what) as tmp:
        adapters.save_lora(tmp, transformer, text_encoder, base_model=base_model, record=record)
    return folder


def write_final(out: Path, recipe: Recipe, transformer, comps) -> dict:
    """The run's deliverables: the adapter (both formats) or the full U-ViT, the loss plot and the validation grids
    before and after training side by side (samples/before_after.png)."""
    written = {}
    # the base, the sampling and pixel-art settings travel with the weights
    record = run_record(recipe.model.base, recipe.validation, pixel_art_settings(recipe))
    if recipe.adapter.kind != "full":  # lora, dora, lokr or loha: an adapter
        text_encoder = comps.text_encoder if recipe.adapter.text_encoder else None
        save_adapter(out / "adapter", transformer, text_encoder, base_model=recipe.model.base, record=record)
        written["adapter"] = str(out / "adapter")
    else:
        with folder_aside(out / "transformer", "the fine-tuned U-ViT") as tmp:
            transformer.save_pretrained(tmp)
            write_record(tmp, record)
        written["transformer"] = str(out / "transformer")
    if recipe.output.loss_plot:
        plot = write_loss_plot(out / METRICS_FILE, out / "loss.png")
        if plot:
            written["loss_plot"] = str(plot)
    from amused_tune.train.validation import write_before_after

    before_after = write_before_after(out)
    if before_after:
        written["before_after"] = str(before_after)
    # the model card, then output.push_to_hub (a failed push keeps the run: see push_error)
    written.update(hub.finish_run(out, recipe.to_dict()))
    return written
