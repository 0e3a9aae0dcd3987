"""`amused-tune ui` without a browser: the command's checks (gradio missing, busy port, who can reach the page), the
Runs tab's reading of run folders, the New run form as a command line, and the page's errors being the commands'
own one-line messages. The page in a real browser: tests/test_ui_browser.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amused_tune.cli import main as cli_main
from amused_tune.ui import command, prepare, processes, runs as runs_mod


def fake_run(root: Path, name: str, steps: int, max_steps: int = 100, finished: bool = False, age_s: float = 0,
             heldout: bool = False) -> Path:
    """A run folder as the trainer leaves it: recipe.yaml, metrics.jsonl, maybe the adapter and a grid."""
    out = root / name
    (out / "samples").mkdir(parents=True)
    (out / "recipe.yaml").write_text(f"model:\n  base: toy\ntrain:\n  max_steps: {max_steps}\nadapter:\n  kind: lora\n")
    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "images_per_s": 10.0, "peak_mem_gb": 0.5} for s in
            range(1, steps + 1)]
    if heldout:
        rows.append({"step": steps, "heldout_loss": 1.5})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "samples" / "step-0.png").write_bytes(b"")
    if finished:
        (out / "adapter").mkdir()
        (out / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    stamp = time.time() - age_s
    for path in (out / "recipe.yaml", out / "metrics.jsonl"):
        os.utime(path, (stamp, stamp))
    return out


# --------------------------------------------------------------------------------------------- the command


def test_ui_listens_on_loopback_unless_asked_and_warns_when_asked():
    args = command.build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.runs) == ("127.0.0.1", 7860, False, "runs")
    assert command.exposure_warning("127.0.0.1", False) is None
    assert "any machine" in command.exposure_warning("0.0.0.0", False)
    assert "public link" in command.exposure_warning("127.0.0.1", True)


def test_ui_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert cli_main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'amused-tune ui: error: the web page needs gradio: pip install "amused-tune[ui]"'


def test_ui_on_a_busy_port_is_one_line(capsys):
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"amused-tune ui: error: port {port} on 127.0.0.1 is in use: pass --port with a free one, or stop "
                   "what listens there"]


def test_ui_runs_that_is_a_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("gradio")
    (tmp_path / "f").write_text("")
    assert cli_main(["ui", "--runs", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.strip().endswith("is a file: pass the folder that holds your runs")


# --------------------------------------------------------------------------------------------- the Runs tab


def test_runs_are_listed_newest_first_with_their_status(tmp_path):
    fake_run(tmp_path, "old-finished", 100, finished=True, age_s=3600)
    fake_run(tmp_path, "stopped", 40, age_s=600)
    fake_run(tmp_path, "live", 7, age_s=1)
    (tmp_path / ".ui" / "compare").mkdir(parents=True)  # the page's own files are no run
    found = runs_mod.list_runs(tmp_path)
    assert [(r.name, r.status, r.step, r.max_steps) for r in found] == [
        ("live", "running", 7, 100), ("stopped", "stopped", 40, 100), ("old-finished", "finished", 100, 100)]
    assert found[0].row()[:4] == ["live", "running", "7 of 100", f"{2 / 7:.4f}"]


def test_a_process_the_page_started_decides_running_or_not(tmp_path):
    live = fake_run(tmp_path, "live", 7, age_s=1)
    found = runs_mod.list_runs(tmp_path, {str(live.resolve()): False})
    assert found[0].status == "stopped"  # its process ended: a fresh metrics.jsonl does not make it running


def test_a_hundred_runs_are_all_listed(tmp_path):
    for k in range(100):
        fake_run(tmp_path, f"run-{k:03d}", 5 + k, age_s=1000 - k)
    found = runs_mod.list_runs(tmp_path)
    assert len(found) == 100 and found[0].name == "run-099" and found[-1].name == "run-000"


def test_a_styledrop_run_of_two_rounds_is_one_run_showing_the_round_it_trains(tmp_path):
    """OUTPUT_DIR holds styledrop.json from the start, round 1 trains in OUTPUT_DIR/round-1 and the last round in
    OUTPUT_DIR itself: the page lists one run, shows round 1's steps and grids while it trains (not an empty run),
    is not finished when round 1 is, and is finished when round 2 is."""
    out = tmp_path / "quickstart-lora"
    out.mkdir()
    (out / "styledrop.json").write_text(json.dumps({"fingerprint": "x", "rounds": 2, "kept": {}}))
    assert [(r.name, r.status, r.round) for r in runs_mod.list_runs(tmp_path)] == [
        ("quickstart-lora", "new", "round 1 of 2")]
    fake_run(out, "round-1", 30, max_steps=200, age_s=1)
    found = runs_mod.list_runs(tmp_path)
    assert [(r.name, r.status, r.step, r.round) for r in found] == [("quickstart-lora", "running", 30, "round 1 of 2")]
    assert found[0].row()[2] == "30 of 200 (round 1 of 2)"
    assert "round 1 of 2" in runs_mod.summary_line(found[0], runs_mod.metric_series(out / "round-1"))
    assert runs_mod.live_folder(out) == (out / "round-1", "round 1 of 2")
    (out / "round-1" / "adapter").mkdir()
    (out / "round-1" / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    rows = "".join(json.dumps({"step": s, "loss": 0.5, "lr": 1e-3}) + "\n" for s in range(1, 201))
    (out / "round-1" / "metrics.jsonl").write_text(rows)
    old = time.time() - 3600
    os.utime(out / "round-1" / "metrics.jsonl", (old, old))
    assert runs_mod.list_runs(tmp_path, {str(out.resolve()): None})[0].status == "stopped"  # round 2 still to come
    fake_run(tmp_path, "quickstart-lora-final", 200, max_steps=200, finished=True)
    for name in ("samples", "adapter", "recipe.yaml", "metrics.jsonl"):
        (tmp_path / "quickstart-lora-final" / name).rename(out / name)
    (tmp_path / "quickstart-lora-final").rmdir()
    found = [r for r in runs_mod.list_runs(tmp_path) if r.name.startswith("quickstart")]
    assert [(r.name, r.status, r.step, r.round) for r in found] == [
        ("quickstart-lora", "finished", 200, "round 2 of 2")]
    assert runs_mod.live_folder(out) == (out, "round 2 of 2")


def test_metric_series_has_raw_smoothed_and_heldout_loss(tmp_path):
    series = runs_mod.metric_series(fake_run(tmp_path, "r", 20, heldout=True))
    assert series["step"] == list(range(1, 21)) and series["loss"][0] == 2.0
    assert series["smoothed"][-1] == pytest.approx(sum(2.0 / s for s in range(11, 21)) / 10)
    assert series["heldout_step"] == [20] and series["heldout_loss"] == [1.5]
    info = runs_mod.run_info(tmp_path / "r")
    assert (info.step, info.loss) == (20, 2.0 / 20)  # the held-out row after it has no training loss
    line = runs_mod.summary_line(info, series)
    assert "step 20 of 100" in line and "lr 1.00e-03" in line and "10.0 images/s" in line and "0.50 GB" in line
    assert "held-out loss 1.5000" in line


def test_the_card_is_shown_without_front_matter_and_with_its_images(tmp_path):
    out = fake_run(tmp_path, "r", 3)
    (out / "README.md").write_text("---\nbase_model: toy\n---\n# r\n\n![grid](samples/step-0.png)\n![x](missing.png)\n")
    text = runs_mod.card_markdown(out, lambda p: f"/file={p.name}")
    assert text.startswith("# r") and "![grid](/file=step-0.png)" in text and "![x](missing.png)" in text


# --------------------------------------------------------------------------------------------- New run


def test_the_form_is_the_command_line(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"")
    form = prepare.Form("quickstart", data_path=str(image), prompt="a cat in [v] style", max_steps=30,
                        output_dir="runs/cat", extra="--adapter.rank=4")
    argv = form.argv()
    assert argv[0] == "quickstart" and argv[1:] == [
        "--data.source=single_image", f"--data.path={image}", "--data.prompt=a cat in [v] style",
        "--train.max_steps=30", "--output.dir=runs/cat", "--adapter.rank=4"]
    assert prepare.Form("quickstart", data_path=str(tmp_path)).argv()[1] == "--data.source=folder"
    assert processes.command_for(["x.yaml", "--data.prompt=a b"])[1] == "amused-tune x.yaml '--data.prompt=a b'"


def test_new_run_errors_are_the_commands_lines(tmp_path, capsys):
    _, error = prepare.parse(prepare.Form("quickstart", data_path=str(tmp_path / "nope")))
    assert cli_main(prepare.Form("quickstart", data_path=str(tmp_path / "nope")).argv()) == 2
    assert capsys.readouterr().err.strip() == f"amused-tune: error: {error}"
    assert error.startswith(f"data.path={tmp_path / 'nope'} does not exist")
    _, error = prepare.parse(prepare.Form("quickstart", extra="--train.max_stepz=3"))
    assert error.startswith("train.max_stepz is not a recipe key: did you mean train.max_steps?")


def test_the_data_check_says_what_would_be_skipped_and_why(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), "red").save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a red square")
    (folder / "c.png").write_text("not an image")
    (folder / "c.txt").write_text("broken")
    recipe, error = prepare.parse(prepare.Form("quickstart", data_path=str(folder), extra="--data.prompt=null"))
    assert error is None
    view = prepare.check_data(recipe)
    assert view.lines[0].startswith(f"3 samples in {folder} (captionfolder): 1 usable, 2 would be skipped")
    assert prepare.check_data(prepare.parse(prepare.Form("quickstart"))[0]).lines[0].startswith("1 sample in ")
    assert any("b.png: no caption" in line for line in view.lines)
    assert any("c.png: not an image" in line for line in view.lines)
    assert view.images == [(str(folder / "a.png"), "a red square")]


def test_the_estimate_lists_each_card_size(monkeypatch):
    from amused_tune.memory import estimate as memory
    from amused_tune.memory import fit as memory_fit
    class Est:
        peak_bytes, peak_gb = int(7.0 * memory.GB), 7.0

        def table(self):
            return "breakdown"

    def fit(recipe, budget, say):
        if budget < 8 * memory.GB:
            raise memory.EstimateError("nothing fits in 6.0 GB")
        say("--max-memory: train.grad_checkpointing: False -> True")

    monkeypatch.setattr(memory, "estimate", lambda recipe: Est())
    monkeypatch.setattr(memory_fit, "fit", fit)
    text, rows = prepare.estimate_text(object())
    assert text == "predicted peak 7.00 GB\nbreakdown"
    assert rows == [["6 GB", "no", "nothing fits in 6.0 GB"],
                    ["8 GB", "yes", "nothing to change"], ["12 GB", "yes", "nothing to change"],
                    ["16 GB", "yes", "nothing to change"], ["24 GB", "yes", "nothing to change"]]
    Est.peak_bytes = int(9.0 * memory.GB)
    assert prepare.estimate_text(object())[1][1] == ["8 GB", "with --max-memory 8GB",
                                                     "train.grad_checkpointing: False -> True"]


def test_the_toy_base_has_no_estimate_and_says_why():
    recipe, _ = prepare.parse(prepare.Form("quickstart"))
    text, rows = prepare.estimate_text(recipe)
    assert rows == [] and text.startswith("model.base=toy: the memory estimate covers the real-size aMUSEd bases")


# --------------------------------------------------------------------------------------------- processes


def test_stop_sends_sigint_to_the_process_the_page_started(tmp_path):
    out = tmp_path / "run"
    # a stand-in for the trainer, which installs its own SIGINT handler (train/stops.py): a pytest started in the
    # background of a script inherits SIGINT ignored, and so would a plain child; it says when it is past its start
    code = ("import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); print('ready', flush=True);"
            " time.sleep(60)")
    sleeper = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline().strip() == "ready"
        (tmp_path / ".ui").mkdir()
        (tmp_path / ".ui" / "run.json").write_text(json.dumps({"pid": sleeper.pid, "out": str(out.resolve()),
                                                              "command": "amused-tune x", "log": "none"}))
        assert processes.alive_runs(tmp_path) == {str(out.resolve()): True}
        assert processes.stop(tmp_path, out).startswith("stopping run: it finishes this step, writes a checkpoint")
        assert sleeper.wait(timeout=10) == -signal.SIGINT
        assert processes.alive_runs(tmp_path) == {str(out.resolve()): False}
        assert processes.stop(tmp_path, out) == "run is not running"
    finally:
        sleeper.kill()
    assert "the page did not start this run" in processes.stop(tmp_path, tmp_path / "other")


# --------------------------------------------------------------------------------------------- Compare and Share


def test_compare_with_an_empty_prompt_is_the_sample_commands_line(tmp_path):
    from amused_tune.ui import actions

    columns = actions.compare(tmp_path, actions.Settings(base="toy", prompt=""), [])
    assert [c.error for c in columns] == ["amused-tune sample: error: the following arguments are required: --prompt"]


def test_compare_with_a_broken_adapter_is_the_sample_commands_line(tmp_path):
    from amused_tune.cli.checks import adapter_problem
    from amused_tune.ui import actions

    broken = tmp_path / "bad.safetensors"
    broken.write_bytes(b"not safetensors")
    columns = actions.compare(tmp_path, actions.Settings(base="toy", prompt="a red circle", steps=1), [str(broken)])
    assert columns[0].error is None and columns[0].image.is_file()
    assert columns[1].error == f"amused-tune sample: error: {adapter_problem(str(broken))}"
    assert columns[1].command.startswith("amused-tune sample --base toy --prompt 'a red circle' --seed 0 --out ")


def test_push_and_merge_errors_are_the_commands_lines(tmp_path):
    from amused_tune.ui import actions

    out = fake_run(tmp_path, "r", 3)
    assert actions.push(str(out), "not a repo id", dry_run=True).startswith(
        "amused-tune: error: --repo-id 'not a repo id' must look like user/name")
    assert actions.merge(str(tmp_path / "missing"), str(tmp_path / "m")) == (
        f"amused-tune: error: {tmp_path / 'missing'} does not exist: pass a run's output.dir, an adapter folder, a "
        ".safetensors file or a Hub id (user/name)")


def test_a_run_that_fails_at_once_shows_the_commands_line(tmp_path):
    out = tmp_path / "runs" / "x"
    processes.start(tmp_path / "runs", out, [str(tmp_path / "nope.yaml")], env={"OMP_NUM_THREADS": "1"})
    said = processes.early_failure(tmp_path / "runs", out, wait_s=60)
    assert said.startswith(f"amused-tune: error: recipe {tmp_path / 'nope.yaml'} not found")
    assert processes.record_of(tmp_path / "runs", out)["command"] == f"amused-tune {tmp_path / 'nope.yaml'}"


# --------------------------------------------------------------------------------------------- what a new user met


def _page(runs: Path, **access):
    pytest.importorskip("gradio")
    from amused_tune.ui.access import Access
    from amused_tune.ui.app import Page

    return Page(runs, Access(runs, **access))


def _sleeper_record(runs: Path, out: Path) -> subprocess.Popen:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    (runs / ".ui").mkdir(exist_ok=True)
    (runs / ".ui" / f"{out.name}.json").write_text(json.dumps({"pid": sleeper.pid, "out": str(out.resolve()),
                                                               "command": "amused-tune x", "log": "none"}))
    return sleeper


def test_stop_shows_only_for_a_run_the_page_is_training_and_polling_stops_when_nothing_runs(tmp_path):
    page = _page(tmp_path)
    empty = page.run_view(None, None)
    assert empty[-1]["visible"] is False  # no run selected: no Stop
    assert page.refresh_list(None)[2].active is False  # nothing runs: the page stops polling
    fake_run(tmp_path, "done", 100, finished=True, age_s=5)
    assert page.run_view("done", None)[-1]["visible"] is False  # a finished run: no Stop
    assert page.refresh_list("done")[2].active is False
    live = fake_run(tmp_path, "live", 7, age_s=1)
    sleeper = _sleeper_record(tmp_path, live)
    try:
        assert page.run_view("live", None)[-1]["visible"] is True  # training in a process the page started
        assert page.refresh_list("live")[2].active is True  # a run is training: the Runs tab polls
    finally:
        sleeper.kill()
        sleeper.wait()
    assert page.run_view("live", None)[-1]["visible"] is False  # its process ended
    starting = tmp_path / "not-yet"  # a process the page started, still loading: no folder yet, but polled for
    sleeper = _sleeper_record(tmp_path, starting)
    try:
        assert page.refresh_list(None)[2].active is True and not starting.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert page.refresh_list(None)[2].active is False
    terminal = fake_run(tmp_path, "terminal", 3, age_s=1)  # training from a terminal: the page cannot stop it
    assert page.run_view(terminal.name, None)[-1]["visible"] is False
    assert page.refresh_list(terminal.name)[2].active is True  # but it is running: the page polls it


def test_the_log_panel_shows_a_terminal_runs_own_log_and_the_pages_when_newer(tmp_path):
    out = fake_run(tmp_path, "terminal", 3, age_s=1)
    (out / "train.log").write_text("\n$ amused-tune q.yaml\ntrain: base toy | ...\ntrain:  33%|x| 1/3\rtrain: 100%|x| 3/3\n")
    page = _page(tmp_path)
    assert page.run_view("terminal", None)[5].splitlines() == ["$ amused-tune q.yaml", "train: base toy | ...",
                                                               "train: 100%|x| 3/3"]
    (tmp_path / ".ui").mkdir()
    (tmp_path / ".ui" / "terminal.log").write_text("amused-tune: error: output.dir=... holds a run of a different "
                                                   "recipe\n")  # a later start from the page that failed at once
    (tmp_path / ".ui" / "terminal.json").write_text(json.dumps({"pid": 2 ** 22 + 1, "out": str(out.resolve()),
                                                                "command": "x", "log": str(tmp_path / ".ui" /
                                                                                             "terminal.log")}))
    stamp = time.time() + 5
    os.utime(tmp_path / ".ui" / "terminal.log", (stamp, stamp))
    view = page.run_view("terminal", None)
    assert "holds a run of a different recipe" in view[5]
    assert view[0].endswith("\namused-tune: error: output.dir=... holds a run of a different recipe")  # said on top


def test_the_fits_table_says_why_it_is_empty_for_the_toy(tmp_path):
    page = _page(tmp_path)
    command_line, _, _, estimate, fits = page.check("quickstart", None, "", "", None, "", "")
    assert command_line == "amused-tune quickstart"
    assert fits == [["any", "not estimated", estimate.splitlines()[0]]]
    assert fits[0][2].startswith("model.base=toy: the memory estimate covers the real-size aMUSEd bases")


def _png(path: Path, size=(32, 32)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _bomb(path: Path, side: int = 30000) -> Path:
    """A PNG whose header claims side x side pixels (a few hundred bytes on disk): decoding 30000 would take 2.7 GB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = zlib.compress(b"\0" * 100)  # far fewer bytes than the header promises
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_uploads_are_checked_and_refused_in_one_line_writing_nothing_outside_the_runs_folder(tmp_path):
    from amused_tune.ui import uploads

    runs, sent = tmp_path / "runs", tmp_path / "sent"
    runs.mkdir()
    sent.mkdir()
    good, caption = _png(sent / "a.png"), sent / "a.txt"
    caption.write_text("a red square in [v] style")
    (sent / "notes.png").write_text("not an image at all")
    refusals = [
        ("style", [("notes.png", sent / "notes.png")], "upload notes.png is not an image PIL can read"),
        ("style", [("bomb.png", _bomb(sent / "bomb.png"))], "too many pixels to decode safely (a decompression bomb)"),
        ("style", [("big.png", _bomb(sent / "big.png", 9000))], "9000x9000 pixels is more than this page decodes"),
        ("style", [("../evil.png", good)], "a file name may not hold a folder or '..'"),
        ("style", [("/etc/evil.png", good)], "an absolute path is not a file name"),
        ("style", [("a.exe", good)], "not an image"),
        ("../escape", [("a.png", good)], "must be one plain name"),
        ("a/b", [("a.png", good)], "must be one plain name"),
        ("style", [("a.png", good), ("notes.png", sent / "notes.png")], "notes.png is not an image"),
    ]
    for name, files, said in refusals:
        with pytest.raises(uploads.UploadError, match=re.escape(said)) as refused:
            uploads.save_uploads(runs, name, files)
        assert "\n" not in str(refused.value)
    (runs / "uploads").mkdir()
    os.symlink(tmp_path / "outside", runs / "uploads" / "linked")  # a planted link may not lead out either
    with pytest.raises(uploads.UploadError, match="outside the runs folder"):
        uploads.save_uploads(runs, "linked", [("a.png", good)])
    # nothing was written anywhere: the refused batch with one good image left no file behind
    assert sorted(p.name for p in (runs / "uploads").iterdir()) == ["linked"] and not (tmp_path / "outside").exists()
    folder, images = uploads.save_uploads(runs, "style", [("a.png", good), ("a.txt", caption)])
    assert folder == (runs / "uploads" / "style").resolve() and images == [folder / "a.png"]
    assert (folder / "a.txt").read_text() == "a red square in [v] style"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["linked", "style"]  # no half-written folder aside
    page = _page(runs)
    said, data_path = page.upload("style", [str(good)])
    assert said.startswith("saved 1 file to") and data_path == str(folder / "a.png")
    said, _ = page.upload("style", [str(sent / "notes.png")])
    assert said == "error: upload notes.png is not an image PIL can read (UnidentifiedImageError): upload a PNG, " \
                   "JPEG or WebP file"


def test_a_page_reachable_from_other_machines_asks_a_password_and_confines_paths(tmp_path, monkeypatch):
    from amused_tune.ui import access

    assert access.login_password("127.0.0.1", False, {}) == (None, False)  # this machine only: no login
    password, printed = access.login_password("0.0.0.0", False, {})
    assert printed and len(password) >= 16
    assert access.login_password("127.0.0.1", True, {access.PASSWORD_ENV: "s3cret"}) == ("s3cret", False)
    assert access.login_password("127.0.0.1", False, {access.PASSWORD_ENV: "s3cret"}) == ("s3cret", False)
    check = access.checker("s3cret")
    assert check("anyone", "s3cret") and not check("anyone", "s3cre") and not check("anyone", "")

    runs, data = tmp_path / "runs", tmp_path / "photos"
    runs.mkdir()
    data.mkdir()
    _png(data / "x.png")
    (tmp_path / "private").mkdir()
    monkeypatch.chdir(tmp_path)
    page = _page(runs, data=[data], confined=True)
    form = ("quickstart", None, "", "", 2, "", "")
    said = page.start("quickstart", None, str(tmp_path / "private"), "", 2, "", "")[1]
    assert said == (f"error: --data.path={tmp_path / 'private'} is outside the runs folder or a data folder named at "
                    "start (--data): this page is reachable from other machines, so it only takes paths inside them")
    for fields, fragment in (
            (("quickstart", None, "", "", 2, str(tmp_path / "elsewhere"), ""), "--output.dir="),
            (("quickstart", None, "", "", 2, "", "--output.dir=../out"), "--output.dir=../out is outside the runs"),
            (("quickstart", None, "", "", 2, "", "--data.cache_dir=/tmp/c"), "--data.cache_dir=/tmp/c is outside"),
            (("quickstart", None, "", "", 2, "", "--model.base=/etc"), "--model.base=/etc is outside"),
            (("/etc/passwd", None, "", "", 2, "", ""), "recipe=/etc/passwd is outside"),
            (("quickstart", None, "../private", "", 2, "", ""), "--data.path=../private is outside")):
        assert fragment in page.check(*fields)[1], fields
    # inside the --data folder and the runs folder: taken; a run without output.dir goes into the runs folder
    command_line, lines, *_ = page.check("quickstart", None, str(data / "x.png"), "a red square in [v] style", 2, "",
                                         "")
    assert f"--output.dir={runs / 'quickstart-lora'}" in command_line and "1 sample" in lines, lines
    assert page.merge(None, "", 1.0, False) == "error: pick a run"
    fake_run(runs, "r", 3, finished=True)
    assert "--out=/tmp/m is outside the runs folder" in page.merge("r", "/tmp/m", 1.0, False)
    gallery, said = page.compare("/etc", [], "", "a red circle", 0, 1.0, "", "", False, 1.0, 1.0)
    assert gallery == [] and "base=/etc is outside" in said
    gallery, said = page.compare("toy", [], str(tmp_path / "private"), "a red circle", 0, 1.0, "", "", False, 1, 1)
    assert gallery == [] and "adapter=" in said and "is outside" in said
    assert access.Access(runs, confined=False).check("/etc", "x") is None  # this machine only: any path


def test_the_page_builds_its_four_tabs_without_serving(tmp_path):
    """The layout is built in the fast set too (the browser test serves it): four tabs, the runs folder named."""
    pytest.importorskip("gradio")
    from amused_tune.ui import layout

    demo = layout.build(tmp_path / "runs")
    config = demo.get_config_file()
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Runs", "New run", "Compare", "Share"]
    assert any(str(tmp_path / "runs") in str(c["props"].get("value", "")) for c in config["components"]
               if c.get("type") == "markdown")
