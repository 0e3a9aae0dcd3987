"""The New run tab's work: the form becomes the command line `amused-tune RECIPE --key=value ...`, parsed by the
CLI's own recipe parser; the data is listed and checked by the data layer's own checks (what training would skip,
and why); `--estimate` and `--max-memory` come from the kit's estimator for the usual card sizes."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from amused_tune.common import kit_path
from amused_tune.data.sources import IMAGE_SUFFIXES

CARD_SIZES_GB = (6, 8, 12, 16, 24)
PREVIEW_IMAGES = 8
CHECKED_SAMPLES = 200  # the page decodes at most this many samples to say what the checks would skip


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in kit_path("recipes").glob("*.yaml"))


@dataclass
class Form:
    """What the New run tab holds. Empty fields leave the recipe's values."""

    recipe: str  # a shipped recipe's name or a YAML file
    data_path: str = ""
    prompt: str = ""
    max_steps: int | None = None
    output_dir: str = ""
    extra: str = ""  # more overrides, as on the command line: --optim.lr=1e-4 --adapter.rank=4

    def argv(self) -> list[str]:
        """The arguments after `amused-tune`, exactly as the CLI takes them."""
        argv = [self.recipe.strip()]  # a shipped recipe by its name, as `amused-tune quickstart` takes it
        data = self.data_path.strip()
        if data:
            single = Path(data).is_file() or (not Path(data).exists() and Path(data).suffix.lower() in IMAGE_SUFFIXES)
            argv += [f"--data.source={'single_image' if single else 'folder'}", f"--data.path={data}"]
        if self.prompt.strip():
            argv.append(f"--data.prompt={self.prompt.strip()}")
        if self.max_steps:
            argv.append(f"--train.max_steps={int(self.max_steps)}")
        if self.output_dir.strip():
            argv.append(f"--output.dir={self.output_dir.strip()}")
        return argv + shlex.split(self.extra or "")


def parse(form: Form):
    """(recipe, None) or (None, the CLI's one-line error)."""
    from amused_tune.cli.args import parse_recipe
    from amused_tune.data.cards import DataError
    from amused_tune.data.preflight import preflight
    from amused_tune.recipe import RecipeError

    if not form.recipe.strip():
        return None, "pick a shipped recipe or upload a YAML file"
    try:
        recipe, _, _ = parse_recipe(form.argv())
        preflight(recipe.data)
    except (RecipeError, DataError) as err:
        return None, str(err)
    return recipe, None


@dataclass
class DataView:
    """The first images with their training prompts, and what the checks would skip."""

    images: list[tuple[str, str]] = field(default_factory=list)  # (file, prompt)
    lines: list[str] = field(default_factory=list)


def check_data(recipe) -> DataView:
    """List the recipe's data and run the data checks on up to CHECKED_SAMPLES samples."""
    from amused_tune.data.cards import DataError
    from amused_tune.data.checks import Report, checked_samples, min_image_size
    from amused_tune.data.preflight import preflight
    from amused_tune.data.preprocess import make_prompt

    view = DataView()
    try:
        part = preflight(recipe.data).parts[0]
        cfg, source = part.cfg, part.source()
    except DataError as err:
        view.lines.append(str(err))
        return view
    min_size = min_image_size(cfg, _resolution(recipe))
    checked = source.records[:CHECKED_SAMPLES]
    report = Report()
    for record, caption, _, _ in checked_samples(source, checked, cfg, min_size, report, stop=False):
        if len(view.images) < PREVIEW_IMAGES and source.kind != "hub":
            view.images.append((str(record.ref), make_prompt(cfg, caption)))
    bad = [f"{key}: {why}" for key, why in report.bad]
    converted = sum(report.converted.values())
    more = f" (checked the first {len(checked)})" if len(source.records) > len(checked) else ""
    n = len(source.records)
    view.lines.append(f"{n} sample{'' if n == 1 else 's'} in {cfg.path} ({source.kind}){more}: "
                      f"{len(checked) - len(bad)} usable, {len(bad)} would be skipped"
                      + (f", {converted} converted to RGB" if converted else "")
                      + (f"; smallest side checked: {min_size} px" if min_size else ""))
    view.lines += [f"skipped: {line}" for line in bad[:20]]
    if len(bad) > 20:
        view.lines.append(f"... and {len(bad) - 20} more")
    if bad and cfg.on_bad_sample == "error":
        view.lines.append("data.on_bad_sample=error: training stops at the first of these; set it to skip to go on")
    return view


def _resolution(recipe) -> int:
    from amused_tune.memory.estimate import EstimateError, resolution_of

    try:
        return resolution_of(recipe)
    except EstimateError:
        return int(recipe.model.resolution or 0)


def estimate_text(recipe) -> tuple[str, list[list[str]]]:
    """(`--estimate`'s breakdown or its one-line error, rows: card size, fits?, what --max-memory changes)."""
    from amused_tune.memory import estimate as memory
    from amused_tune.memory import fit as memory_fit
    try:
        est = memory.estimate(recipe)
    except memory.EstimateError as err:
        return str(err), []
    rows = []
    for size in CARD_SIZES_GB:
        budget = size * memory.GB
        if est.peak_bytes <= budget - memory.CUDA_CONTEXT_GB * memory.GB:
            rows.append([f"{size} GB", "yes", "nothing to change"])
            continue
        said: list[str] = []
        try:
            memory_fit.fit(recipe, budget, say=said.append)
        except memory.EstimateError as err:
            rows.append([f"{size} GB", "no", str(err)])
            continue
        changes = [line.removeprefix("--max-memory: ") for line in said]
        rows.append([f"{size} GB", f"with --max-memory {size}GB", "; ".join(changes)])
    return f"predicted peak {est.peak_gb:.2f} GB\n{est.table()}", rows
