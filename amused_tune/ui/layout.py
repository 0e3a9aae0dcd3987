"""The page's components, one function per tab, wired to the handlers of app.Page."""

from __future__ import annotations

import gradio as gr

from amused_tune.ui import prepare, runs as runs_mod
from amused_tune.ui.app import POLL_S, Page, guarded

TITLE = "amused-tune"
CURVE_COLOURS = {"loss": "#60a5fa", f"mean of {runs_mod.SMOOTH}": "#ea580c", "held-out": "#16a34a"}


def build(runs_dir, access=None) -> gr.Blocks:
    """The whole page for the runs under `runs_dir`; `access`: where its paths may point (ui/access.py)."""
    return blocks(Page(runs_dir, access))


def blocks(page: Page) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE} · runs in `{page.runs}`")
        with gr.Tabs():
            with gr.Tab("Runs", id="runs"):
                run_choice, timer = runs_tab(page, demo)
            with gr.Tab("New run", id="new"):
                new_run_tab(page, timer)
            with gr.Tab("Compare", id="compare") as compare_tab_:
                compare_tab(page, compare_tab_)
            with gr.Tab("Share", id="share") as share_tab_:
                share_tab(page, share_tab_, run_choice)
    return demo


def runs_tab(page: Page, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Timer]:
    rows, names = page.table()
    with gr.Row():
        with gr.Column(scale=2):
            table = gr.Dataframe(value=rows or None, headers=["run", "status", "step", "loss", "updated"],
                                 interactive=False, label="runs, newest first", elem_id="runs-table", max_height=260)
        with gr.Column(scale=1):
            choice = gr.Dropdown(names, value=names[0] if names else None, label="run", elem_id="run-choice")
            with gr.Row():
                refresh = gr.Button("Refresh", elem_id="refresh-runs", size="sm")
                # shown only while a run this page started is training (the only runs the page can stop)
                stop = gr.Button("Stop (writes a checkpoint)", variant="stop", elem_id="stop-run", size="sm",
                                 visible=False)
            stopped = gr.Markdown(elem_id="stop-message")
    status = gr.Markdown(elem_id="run-status")
    # no fixed height: the chart sizes itself, its legend (each step, the mean, held-out) included
    plot = gr.LinePlot(x="step", y="loss", color="curve", label="loss curve", show_label=False,
                       elem_id="loss-plot", color_map=CURVE_COLOURS)
    grid_step = gr.Slider(0, 1, value=0, step=1, label="validation grid", elem_id="grid-step")
    # the grid at a readable size (at least GRID_MIN_PX wide, its labels legible), full screen on request
    grid = gr.Image(label="validation grid", type="filepath", elem_id="grid-image", show_label=False,
                    interactive=False, buttons=["fullscreen", "download"])
    eval_table = gr.Markdown(elem_id="eval-table")
    with gr.Accordion("log (the run's train.log)", open=True):
        log = gr.Textbox(lines=8, max_lines=12, show_label=False, elem_id="run-log")
    with gr.Accordion("model card", open=False):
        card = gr.Markdown(elem_id="model-card")

    view_outputs = [status, plot, grid_step, grid, eval_table, log, stop]
    view = guarded(page.run_view, len(view_outputs))
    listing = guarded(page.refresh_list, 3)
    pinned = gr.State(None)  # the grid the slider holds, None: the newest
    timer = gr.Timer(POLL_S)  # on while a run is running or starting (refresh_list turns it off and on)
    timer.tick(listing, choice, [table, choice, timer], show_progress="hidden")
    timer.tick(view, [choice, pinned], view_outputs, show_progress="hidden")
    refresh.click(listing, choice, [table, choice, timer], show_progress="hidden").then(
        view, [choice, pinned], view_outputs, show_progress="hidden")
    choice.change(lambda: None, None, pinned).then(view, [choice, pinned], view_outputs, show_progress="hidden")
    choice.change(guarded(page.card, 1), choice, card, show_progress="hidden")
    grid_step.release(guarded(page.pin, 1), [choice, grid_step], pinned).then(
        view, [choice, pinned], view_outputs, show_progress="hidden")
    table.select(_row_name, None, choice)
    stop.click(guarded(page.stop, 1), choice, stopped)
    demo.load(listing, choice, [table, choice, timer], show_progress="hidden")
    demo.load(view, [choice, gr.State(None)], view_outputs, show_progress="hidden")
    demo.load(guarded(page.card, 1), choice, card, show_progress="hidden")
    return choice, timer


def _row_name(evt: gr.SelectData) -> str:
    return evt.row_value[0]


def new_run_tab(page: Page, timer: gr.Timer) -> None:
    gr.Markdown("Pick a recipe, point it at your images, check what it will train on and how much memory it "
                "needs, then start it. The run trains in its own process: closing this page does not stop it.")
    with gr.Row():
        recipe = gr.Dropdown(prepare.shipped_recipes(), value="quickstart", label="shipped recipe",
                             elem_id="recipe", allow_custom_value=True)
        upload = gr.File(label="or upload a recipe (YAML)", file_types=[".yaml", ".yml"], type="filepath",
                         elem_id="recipe-upload", height=110)
    with gr.Row():
        data_path = gr.Textbox(label="data.path: a folder of captioned images, or one image (empty: the recipe's)",
                               elem_id="data-path")
        prompt = gr.Textbox(label="data.prompt (one image: its caption, with the style words)", elem_id="data-prompt")
    with gr.Accordion("or upload images (and their .txt captions)", open=False):
        with gr.Row():
            images_up = gr.File(label="images and captions", file_count="multiple", type="filepath",
                                elem_id="images-upload", height=110)
            upload_name = gr.Textbox(label=f"saved to {page.runs}/uploads/NAME: NAME", placeholder="my_style",
                                     elem_id="upload-name")
            upload_go = gr.Button("Upload", elem_id="upload-images")
        uploaded = gr.Markdown(elem_id="upload-message")
    with gr.Row():
        max_steps = gr.Number(None, label="train.max_steps (0: the recipe's)", precision=0, elem_id="max-steps")
        output_dir = gr.Textbox(label="output.dir (empty: the recipe's)", elem_id="output-dir")
        extra = gr.Textbox(label="more overrides, as on the command line", placeholder="--optim.lr=1e-4 --adapter.rank=4",
                           elem_id="extra")
    fields = [recipe, upload, data_path, prompt, max_steps, output_dir, extra]
    with gr.Row():
        check = gr.Button("Check data and memory", elem_id="check-run")
        start = gr.Button("Start", variant="primary", elem_id="start-run")
        stop = gr.Button("Stop (writes a checkpoint)", variant="stop", elem_id="stop-new-run", visible=False)
    command = gr.Textbox(label="the command this runs (the same on a terminal)", elem_id="command", interactive=False)
    message = gr.Markdown(elem_id="new-run-message")
    with gr.Row():
        data_lines = gr.Markdown(elem_id="data-check")
        images = gr.Gallery(label="the first images, with their training prompts", columns=4, height=260,
                            elem_id="data-images", object_fit="contain", fit_columns=False)
    fits = gr.Dataframe(headers=["GPU", "fits", "what --max-memory changes"], interactive=False,
                        label="which cards it fits", elem_id="fits", wrap=True)
    estimate = gr.Textbox(label="--estimate (predicted peak GPU memory)", lines=4, max_lines=30, elem_id="estimate",
                          interactive=False)
    check.click(guarded(page.check, 5), fields, [command, data_lines, images, estimate, fits], api_name="check")
    started = start.click(guarded(page.start, 2), fields, [command, message], api_name="start")
    # the Stop of this tab shows once a run started here, and the Runs tab polls again
    started.then(lambda said: (gr.update(visible=str(said).startswith("started")), gr.Timer(active=True)), message,
                 [stop, timer])
    stop.click(guarded(page.stop_started, 1), fields, message, api_name="stop").then(
        lambda: gr.update(visible=False), None, stop)
    upload_go.click(guarded(page.upload, 2), [upload_name, images_up], [uploaded, data_path], api_name="upload")


def compare_tab(page: Page, tab: gr.Tab) -> None:
    gr.Markdown("The base and up to three runs or adapters, the same prompt and seed. Each image is what "
                "`amused-tune sample` writes, its settings in the PNG's text chunks; the commands are below.")
    with gr.Row():
        base = gr.Textbox("toy", label="base (Hub id, folder, toy or tiny)", elem_id="compare-base")
        chosen = gr.Dropdown(page.adapter_runs(), multiselect=True, max_choices=3, label="runs (their adapters)",
                             elem_id="compare-runs")
        paths = gr.Textbox(label="or adapter paths / Hub ids, one a line", lines=1, elem_id="compare-paths")
    prompt = gr.Textbox(label="prompt", elem_id="compare-prompt")
    with gr.Row():
        seed = gr.Number(0, label="seed", precision=0, elem_id="compare-seed")
        scale = gr.Slider(0, 2, value=1.0, step=0.05, label="adapter scale", elem_id="compare-scale")
        guidance = gr.Textbox(label="guidance (empty: the base's default; <= 1: off)", elem_id="compare-guidance")
        steps = gr.Textbox(label="steps (empty: the base's default)", elem_id="compare-steps")
    with gr.Row():
        use_sd = gr.Checkbox(False, label="StyleDrop guidance for the adapters", elem_id="compare-styledrop")
        lam_a = gr.Number(1.0, label="lambda A (adapter vs base)")
        lam_b = gr.Number(1.0, label="lambda B (text)")
    go = gr.Button("Generate", variant="primary", elem_id="compare-generate")
    gallery = gr.Gallery(label="same prompt, same seed", columns=4, height=340, elem_id="compare-gallery",
                         object_fit="contain", fit_columns=False)
    message = gr.Markdown(elem_id="compare-message")
    chosen.change(guarded(page.base_of, 1), chosen, base)
    tab.select(lambda: gr.update(choices=page.adapter_runs()), None, chosen)
    go.click(guarded(page.compare, 2), [base, chosen, paths, prompt, seed, scale, guidance, steps, use_sd, lam_a,
                                        lam_b], [gallery, message], api_name="compare")


def share_tab(page: Page, tab: gr.Tab, run_choice: gr.Dropdown) -> None:
    run = gr.Dropdown(label="run", elem_id="share-run")
    tab.select(lambda current: gr.update(choices=[r.name for r in page.listing()], value=current), run_choice, run)
    gr.Markdown("### Merge\nFuse the run's LoRA into its base: a full pipeline folder that `AmusedPipeline` loads.")
    with gr.Row():
        out = gr.Textbox(label="--out (empty: RUN-merged next to the run)", elem_id="merge-out")
        scale = gr.Number(1.0, label="--scale")
        overwrite = gr.Checkbox(False, label="--overwrite")
    merge = gr.Button("Merge", elem_id="merge")
    gr.Markdown("### Push to the Hugging Face Hub\nThe token is your usual login (`hf auth login`, or `HF_TOKEN`): "
                "this page never asks for it, shows it or stores it.")
    with gr.Row():
        repo = gr.Textbox(label="--repo-id (user/name)", elem_id="push-repo")
        private = gr.Checkbox(False, label="--private")
        dry = gr.Checkbox(True, label="--dry-run (list the files only)")
    push = gr.Button("Push", elem_id="push")
    message = gr.Markdown(elem_id="share-message")
    merge.click(guarded(page.merge, 1), [run, out, scale, overwrite], message, api_name="merge")
    push.click(guarded(page.push, 1), [run, repo, private, dry], message, api_name="push")
