"""The page's handlers: what each button and each poll of the Runs tab does, on top of runs.py, prepare.py,
processes.py and actions.py (which call the kit's own functions and commands). layout.py places and wires them."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from amused_tune.ui import actions, prepare, processes, runs as runs_mod, uploads
from amused_tune.ui.access import Access, AccessError

POLL_S = 2.0
ACTIVE = ("running", "starting")  # the Runs tab polls while a run has one of these statuses
GRID_MIN_PX = 512  # the validation grid is shown at least this wide (its labels readable), zoomable
CSS = """
#run-status p, #new-run-message p, #compare-message p, #share-message p { font-size: 1.05rem; }
#compare-gallery img, #grid-image img, #data-images img { image-rendering: pixelated; }
#grid-image img { min-width: %dpx; width: 100%%; max-width: 1024px; height: auto; object-fit: contain; }
#grid-image { overflow-x: auto; }
#estimate textarea, #run-log textarea { font-family: ui-monospace, monospace; font-size: 0.8rem; }
""" % GRID_MIN_PX


class Page:
    """The page's state: the runs folder and where its paths may point; handlers are its methods (so the tests can
    call them without a browser)."""

    def __init__(self, runs_dir: str | Path, access: Access | None = None):
        self.runs = Path(runs_dir)
        self.access = access or Access(self.runs)

    # ------------------------------------------------------------------------------------------ Runs
    def listing(self) -> list[runs_mod.RunInfo]:
        return runs_mod.list_runs(self.runs, processes.alive_runs(self.runs))

    def table(self):
        found = self.listing()
        names = [r.name for r in found]
        return [r.row() for r in found], names

    def refresh_list(self, current: str | None):
        """The table, the run choice, and the poll timer: on while a run is running or starting, off otherwise (a
        page left open on finished runs sends nothing; Refresh, or starting a run, turns it on again)."""
        alive = processes.alive_runs(self.runs)
        found = runs_mod.list_runs(self.runs, alive)
        rows, names = [r.row() for r in found], [r.name for r in found]
        chosen = current if current in names else (names[0] if names else None)
        # a process the page started counts before its folder holds a recipe.yaml (while it imports and loads)
        active = any(r.status in ACTIVE for r in found) or any(alive.values())
        return gr.update(value=rows or None), gr.update(choices=names, value=chosen), gr.Timer(active=active)

    def folder_of(self, name: str | None) -> Path | None:
        if not name:
            return None
        return next((r.path for r in self.listing() if r.name == name), None)

    def pin(self, name: str | None, value: float) -> int | None:
        """The grid the slider was moved to, or None (follow the newest grid) when it was moved to the newest."""
        path = self.folder_of(name)
        newest = len(runs_mod.grids(runs_mod.live_folder(path)[0])) - 1 if path else 0
        return None if value is None or value >= newest else int(value)

    def run_view(self, name: str | None, grid_index: int | None):
        """status line, loss chart, grid slider, grid image, eval table, log tail for the chosen run; the grid is
        the newest unless the slider pinned an older one (`grid_index`)."""
        path = self.folder_of(name)
        if path is None:
            return ("No runs yet under " + str(self.runs) + ": start one from New run.", None,
                    gr.update(maximum=1, value=0), None, "", "", gr.update(visible=False))
        alive = processes.alive_runs(self.runs).get(str(path.resolve()))
        info = runs_mod.run_info(path, alive)
        live = info.live  # a StyleDrop run of several rounds: the round training now
        series = runs_mod.metric_series(live)
        grids = runs_mod.grids(live)
        index = len(grids) - 1 if grid_index is None or grid_index >= len(grids) - 1 else int(grid_index)
        grid = grids[index] if grids else None
        slider = gr.update(minimum=0, maximum=max(len(grids) - 1, 1), value=max(index, 0),
                           label=f"validation grid: step {grid[0]}" if grid else "validation grid: none yet")
        stoppable = bool(alive) and info.status in ACTIVE  # only a process this page started can be stopped here
        log = processes.log_tail(self.runs, path)
        summary = runs_mod.summary_line(info, series)
        last = log.rsplit("\n", 1)[-1]
        if info.status not in ACTIVE and "error:" in last:  # how the run ended, the command's own line
            summary += f"  \n{last}"
        return (summary, loss_frame(series), slider, str(grid[1]) if grid else None, runs_mod.eval_markdown(live), log,
                gr.update(visible=stoppable))

    def card(self, name: str | None) -> str:
        path = self.folder_of(name)
        return runs_mod.card_markdown(path, lambda p: f"/gradio_api/file={p.resolve()}") if path else ""

    def stop(self, name: str | None) -> str:
        path = self.folder_of(name)
        return processes.stop(self.runs, path) if path else "pick a run"

    # ------------------------------------------------------------------------------------------ New run
    def form(self, recipe, upload, data_path, prompt, max_steps, output_dir, extra) -> prepare.Form:
        chosen = upload if upload else recipe or ""
        return prepare.Form(str(chosen), data_path or "", prompt or "", int(max_steps) if max_steps else None,
                            output_dir or "", extra or "")

    def parsed(self, form: prepare.Form):
        """(recipe, None) or (None, one line): the form parsed by the CLI's parser, its paths checked where the page
        is confined (reachable from other machines); a confined page puts a run without output.dir in the runs
        folder."""
        try:
            self.access.check_argv(form.argv())
            recipe, error = prepare.parse(form)
            if error:
                return None, error
            if self.access.confined and not form.output_dir.strip():
                form.output_dir = str(self.runs / Path(recipe.output.dir).name)
                recipe, error = prepare.parse(form)
                if error:
                    return None, error
            self.access.check_recipe(recipe)
        except AccessError as err:
            return None, str(err)
        return recipe, None

    def check(self, *fields):
        form = self.form(*fields)
        recipe, error = self.parsed(form)
        command = processes.command_for(form.argv())[1]
        if error:
            return command, f"error: {error}", [], "", None
        view = prepare.check_data(recipe)
        text, rows = prepare.estimate_text(recipe)
        if not rows:  # the toy and tiny bases (or a recipe the estimator cannot read): say why the table is empty
            rows = [["any", "not estimated", text.splitlines()[0] if text else "no estimate for this recipe"]]
        listed = [f"`{Path(f).name}`: {cap}" for f, cap in view.images]
        lines = "\n\n".join(view.lines + (["first images, with the prompts they train with:"] + listed if listed else []))
        return command, lines, [(thumbnail(f), cap) for f, cap in view.images], text, rows

    def start(self, *fields):
        form = self.form(*fields)
        recipe, error = self.parsed(form)
        command = processes.command_for(form.argv())[1]
        if error:
            return command, f"error: {error}"
        out = Path(recipe.output.dir)
        try:
            record = processes.start(self.runs, out, form.argv())
        except RuntimeError as err:
            return command, f"error: {err}"
        failed = processes.early_failure(self.runs, out)
        if failed:
            return command, failed
        inside = out.resolve().is_relative_to(self.runs.resolve())
        where = "" if inside else f" (its folder {out} is outside {self.runs}: the Runs tab does not list it)"
        return command, (f"started `{out.name}` (pid {record['pid']}); it trains in its own process, so closing this "
                         f"page does not stop it. Watch it in Runs{where}.")

    def stop_started(self, *fields):
        recipe, error = self.parsed(self.form(*fields))
        return f"error: {error}" if error else processes.stop(self.runs, Path(recipe.output.dir))

    def upload(self, name: str, files) -> tuple[str, object]:
        """Uploaded images (and captions) into RUNS/uploads/NAME/: (one line, the data.path field's new value)."""
        held = [str(f) for f in (files or [])]
        try:
            folder, images = uploads.save_uploads(self.runs, name, [(Path(f).name, f) for f in held])
        except uploads.UploadError as err:
            return f"error: {err}", gr.update()
        data_path = images[0] if len(images) == 1 else folder
        return (f"saved {len(held)} file{'' if len(held) == 1 else 's'} to `{folder}`; data.path is set to "
                f"`{data_path}`", str(data_path))

    # ------------------------------------------------------------------------------------------ Compare
    def adapter_runs(self) -> list[str]:
        return [r.name for r in self.listing() if (r.path / "adapter").is_dir()]

    def base_of(self, names: list[str]) -> str:
        for name in names or []:
            path = self.folder_of(name)
            base = (runs_mod._recipe(path).get("model") or {}).get("base") if path else None
            if base:
                return str(base)
        return "toy"

    def compare(self, base, chosen, paths, prompt, seed, scale, guidance, steps, use_sd, lam_a, lam_b):
        adapters = [str(self.folder_of(n)) for n in (chosen or []) if self.folder_of(n)]
        adapters += [p.strip() for p in (paths or "").splitlines() if p.strip()]
        if len(adapters) > actions.MAX_ADAPTERS:
            return [], f"error: up to {actions.MAX_ADAPTERS} runs or adapters at a time, got {len(adapters)}"
        try:
            self.access.check(base, "base")
            for adapter in adapters:
                self.access.check(adapter, "adapter")
        except AccessError as err:
            return [], f"error: {err}"
        try:
            steps_n = int(steps) if str(steps or "").strip() else None
            guidance_g = float(guidance) if str(guidance or "").strip() else None
        except ValueError:
            return [], "error: steps must be a whole number and guidance a number (or leave them empty)"
        settings = actions.Settings(base or "toy", prompt or "", int(seed or 0), steps_n, guidance_g, float(scale),
                                    (float(lam_a), float(lam_b)) if use_sd else None)
        columns = actions.compare(self.runs, settings, adapters)
        gallery = [(str(c.image), c.label) for c in columns if c.image]
        lines = []
        for c in columns:
            lines.append(f"**{c.label}**: " + (f"error: {c.error}" if c.error else f"`{c.image}`"))
            lines.append(f"`{c.command}`")
        return gallery, "\n\n".join(lines)

    # ------------------------------------------------------------------------------------------ Share
    def merge(self, name, out, scale, overwrite):
        path = self.folder_of(name)
        if path is None:
            return "error: pick a run"
        out = out or f"{path}-merged"
        try:
            self.access.check(out, "--out", write=True)
        except AccessError as err:
            return f"error: {err}"
        return actions.merge(str(path), out, float(scale), bool(overwrite))

    def push(self, name, repo_id, private, dry_run):
        path = self.folder_of(name)
        if path is None:
            return "error: pick a run"
        return actions.push(str(path), repo_id or "", bool(private), bool(dry_run)).replace("\n", "  \n")


def thumbnail(file: str, size: int = 256):
    """The image as the page shows it: a copy (the data may lie outside what the page serves), small ones scaled
    up without blur, large ones down."""
    from PIL import Image

    with Image.open(file) as image:
        image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def loss_frame(series: dict):
    """Long-form rows (step, loss, curve) for the chart: raw, smoothed and, when logged, held-out."""
    import pandas as pd

    rows = [(s, v, "loss") for s, v in zip(series["step"], series["loss"])]
    rows += [(s, v, f"mean of {runs_mod.SMOOTH}") for s, v in zip(series["step"], series["smoothed"])]
    rows += [(s, v, "held-out") for s, v in zip(series["heldout_step"], series["heldout_loss"])]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]) if rows else None


def guarded(fn, outputs: int):
    """`fn` with any unexpected exception turned into one line on the page (gr.Error), never a traceback."""
    def call(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - the browser gets one line; the server log keeps the traceback
            import logging

            logging.getLogger(__name__).exception("ui handler failed")
            raise gr.Error(one_line(err)) from None
    return call


def one_line(err: Exception) -> str:
    """An unexpected error as the page shows it: a failed write names its file and the reason (a full disk, a
    read-only folder), anything else its type and first line."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    said = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {said}"
