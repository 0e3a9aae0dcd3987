"""The Runs tab's reading of run folders: which runs there are, newest first, and what each holds (status, step of
max, metrics, sample grids, the toy eval table, the model card). Reads files only; imports neither gradio nor torch
at import time, so the page starts fast and a listing of 100 runs stays cheap (bench/ui_startup.py)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from amused_tune.common import DIFFUSERS_FILE, METRICS_FILE, RECIPE_FILE, ROUNDS_FILE
from amused_tune.share.card import CARD, sample_grids

RECENT_S = 120  # a run whose metrics.jsonl changed this recently, and that is not finished, counts as running
SMOOTH = 10  # the smoothed loss curve: the mean of this many logged steps (the card's final loss uses as many)


@dataclass
class RunInfo:
    """One row of the runs table."""

    name: str
    path: Path
    status: str  # running, finished, stopped, starting, new
    step: int
    max_steps: int | None
    loss: float | None
    updated: float  # mtime of the newest of recipe.yaml / metrics.jsonl
    round: str = ""  # a StyleDrop run of several rounds: "round k of n", the one training or last trained
    live: Path | None = None  # the folder whose metrics and grids show it now (`live_folder`)

    def row(self) -> list:
        of = f"{self.step} of {self.max_steps}" if self.max_steps else str(self.step)
        of += f" ({self.round})" if self.round else ""
        loss = "" if self.loss is None or not math.isfinite(self.loss) else f"{self.loss:.4f}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.updated))
        return [self.name, self.status, of, loss, when]


def run_folders(root: Path) -> list[Path]:
    """Every folder under `root` (one or two levels down) that holds a run's recipe.yaml, or a StyleDrop run of
    several rounds (its styledrop.json: one run, whose round-k folders are not listed apart)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob(f"*/{RECIPE_FILE}")] + [p.parent for p in root.glob(f"*/*/{RECIPE_FILE}")]
    found += [p.parent for p in root.glob(f"*/{ROUNDS_FILE}")]
    found = [p for p in found if not (p.parent / ROUNDS_FILE).is_file()]  # a round of a run listed itself
    return sorted({p for p in found if not p.name.startswith(".") and not p.parent.name.startswith(".")})


def rounds_of(path: Path) -> int:
    """How many StyleDrop rounds the run in `path` trains (1: a plain run)."""
    try:
        return int(json.loads((Path(path) / ROUNDS_FILE).read_text()).get("rounds", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def live_folder(path: Path) -> tuple[Path, str]:
    """The folder whose files show the run in `path` now, and which round it is ("" for a plain run): a run of n
    StyleDrop rounds trains round k < n in OUTPUT_DIR/round-k and the last round in OUTPUT_DIR itself."""
    path = Path(path)
    rounds = rounds_of(path)
    if rounds <= 1:
        return path, ""
    from amused_tune.styledrop.rounds import round_dir

    for k in range(rounds, 0, -1):
        if (round_dir(path, k, rounds) / RECIPE_FILE).is_file():
            return round_dir(path, k, rounds), f"round {k} of {rounds}"
    return round_dir(path, 1, rounds), f"round 1 of {rounds}"


def _recipe(path: Path) -> dict:
    try:
        return yaml.safe_load((path / RECIPE_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def max_steps_of(recipe: dict) -> int | None:
    value = (recipe.get("train") or {}).get("max_steps")
    return int(value) if isinstance(value, int) else None


def last_row(metrics: Path) -> dict | None:
    """The last complete training-step row of a metrics.jsonl, read from its end (a long run's file is not read
    whole)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    found = None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            if "loss" in row:  # a training step's row (a held-out row has only step and heldout_loss)
                return row
            found = found or row
    return found


def finished_weights(path: Path, recipe: dict) -> bool:
    if (recipe.get("adapter") or {}).get("kind") == "full":
        return (path / "transformer" / "config.json").is_file()
    return (path / "adapter" / DIFFUSERS_FILE).is_file()


def run_info(path: Path, alive: bool | None = None, now: float | None = None) -> RunInfo:
    """The run in `path`; `alive`: whether a process the page started is training it (None: not known). A run of
    several StyleDrop rounds shows the round training (or last trained); it is finished when its last round is."""
    run, (path, round_said) = path, live_folder(path)
    recipe = _recipe(path)
    metrics = path / METRICS_FILE
    last = last_row(metrics) if metrics.is_file() else None
    times = [p.stat().st_mtime for p in (path / RECIPE_FILE, metrics) if p.exists()]
    updated = max(times) if times else 0.0
    step = int(last["step"]) if last else 0
    max_steps = max_steps_of(recipe)
    done = path == run and finished_weights(path, recipe) and (max_steps is None or step >= max_steps)
    recent = metrics.is_file() and (now or time.time()) - metrics.stat().st_mtime < RECENT_S
    if alive:
        status = "running" if last else "starting"
    elif done:
        status = "finished"
    elif alive is None and recent:
        status = "running"
    else:
        status = "stopped" if last or (path / "checkpoints").is_dir() else "new"
    loss = last.get("loss") if last else None
    return RunInfo(run.name, run, status, step, max_steps, loss if isinstance(loss, (int, float)) else None, updated,
                   round_said, path)


def list_runs(root: Path, alive: dict[str, bool] | None = None) -> list[RunInfo]:
    """The runs under `root`, newest first; `alive` maps a run folder (resolved, as str) to whether a process the
    page started is training it."""
    alive = alive or {}
    now = time.time()
    runs = [run_info(p, alive.get(str(p.resolve())), now) for p in run_folders(root)]
    return sorted(runs, key=lambda r: r.updated, reverse=True)


# --------------------------------------------------------------------------------------------- one run


def metric_series(path: Path) -> dict[str, list]:
    """Columns for the charts: step, loss, smoothed loss, held-out loss (when logged), lr, images/s, peak GB."""
    from amused_tune.train.outputs import read_metrics

    rows = [r for r in read_metrics(Path(path) / METRICS_FILE) if isinstance(r, dict) and "step" in r]
    out: dict[str, list] = {"step": [], "loss": [], "smoothed": [], "lr": [], "images_per_s": [], "peak_mem_gb": [],
                            "heldout_step": [], "heldout_loss": []}
    window: list[float] = []
    for r in rows:
        loss = r.get("loss")
        if "lr" in r and isinstance(loss, (int, float)) and math.isfinite(loss):
            window = (window + [float(loss)])[-SMOOTH:]
            out["step"].append(int(r["step"]))
            out["loss"].append(float(loss))
            out["smoothed"].append(sum(window) / len(window))
            out["lr"].append(r.get("lr"))
            out["images_per_s"].append(r.get("images_per_s"))
            out["peak_mem_gb"].append(r.get("peak_mem_gb"))
        if isinstance(r.get("heldout_loss"), (int, float)):
            out["heldout_step"].append(int(r["step"]))
            out["heldout_loss"].append(float(r["heldout_loss"]))
    return out


def summary_line(info: RunInfo, series: dict[str, list]) -> str:
    """status, step of max, lr, images/s and peak memory of the newest logged step, in one line."""
    parts = [f"**{info.status}**", f"step {info.step} of {info.max_steps}" if info.max_steps else f"step {info.step}"]
    if info.round:
        parts.insert(1, info.round)
    if series["step"]:
        lr, speed, peak = series["lr"][-1], series["images_per_s"][-1], series["peak_mem_gb"][-1]
        parts.append(f"loss {series['loss'][-1]:.4f} (mean of last {min(SMOOTH, len(series['loss']))}: "
                     f"{series['smoothed'][-1]:.4f})")
        if isinstance(lr, (int, float)):
            parts.append(f"lr {lr:.2e}")
        if isinstance(speed, (int, float)):
            parts.append(f"{speed:.1f} images/s")
        if isinstance(peak, (int, float)):
            parts.append(f"peak memory {peak:.2f} GB")
    if series["heldout_loss"]:
        parts.append(f"held-out loss {series['heldout_loss'][-1]:.4f}")
    return " · ".join(parts)


def grids(path: Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's validation grids, oldest first (the same prompts and seeds at every step)."""
    return [(step, Path(path) / rel) for step, rel in sample_grids(Path(path))]


def eval_markdown(path: Path) -> str:
    """The toy evaluation's table when the run has an eval.json, else ""."""
    from amused_tune.toy.report import eval_lines

    try:
        return "\n".join(eval_lines(Path(path))).strip()
    except (OSError, ValueError, KeyError, TypeError):
        return "eval.json could not be read: rerun `python -m amused_tune.toy eval --adapter RUN_DIR`"


def card_markdown(path: Path, file_url) -> str:
    """The run's model card without its YAML front matter; its relative images point at `file_url(path)`."""
    card = Path(path) / CARD
    if not card.is_file():
        return "No model card yet: the run writes README.md when it finishes."
    text = re.sub(r"^---\s*\n.*?\n---\s*\n", "", card.read_text(errors="replace"), count=1, flags=re.S)

    def link(match: re.Match) -> str:
        target = Path(path) / match[2]
        return f"![{match[1]}]({file_url(target)})" if target.is_file() else match[0]

    return re.sub(r"!\[([^\]]*)\]\((?!https?:)([^)\s]+)\)", link, text)
