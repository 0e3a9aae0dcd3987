"""A newcomer's first hour, met at the command line: an own folder of captioned images trains on its captions,
no user mistake in any subcommand ends in a traceback, the hints name commands that exist, a run says what it does
while it does it, the help leads, and the validation grids of the small bases can be seen.

Every error here is one line on stderr starting with `<prog>: error:`, exit code 2 (docs/errors.md lists them).
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from amused_tune.cli import main as cli_main
from conftest import make_images
from helpers import one_error, no_model_loading  # noqa: F401 (a fixture: loading a base model fails the test)

REPO = Path(__file__).resolve().parent.parent
FAST = ["--model.base=tiny", "--train.max_steps=3", "--train.checkpoint_every=3", "--output.loss_plot=false",
        "--validation.prompts=[]", "--validation.from_data=0", "--styledrop.rounds=1"]  # (the quickstart runs 2)


def caption_folder(folder: Path, n: int = 4) -> Path:
    """The images of `make_images` with a same-named .txt caption each (the captions metadata.jsonl would give)."""
    make_images(folder, n=n, captions=False)
    for i in range(n):
        (folder / f"img{i}.txt").write_text(f"a picture number {i}")
    return folder


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def print_config(capsys, argv: list[str]) -> dict:
    assert cli_main(argv + ["--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="module")
def txt_folder(tmp_path_factory) -> Path:
    return caption_folder(tmp_path_factory.mktemp("own") / "photos")


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("own-jsonl") / "photos")


# --------------------------------------------------------------------------------------------- own folder


def test_my_folder_recipe_from_an_empty_folder_trains_on_the_folders_own_captions(tmp_path, monkeypatch, capsys,
                                                                                    txt_folder, jsonl_folder):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["recipes", "cp", "my_folder", "my.yaml"]) == 0
    text = Path("my.yaml").read_text()
    assert len(re.findall(r"(?m)^\s+path:", text)) == 1  # "edit one path"
    Path("my.yaml").write_text(re.sub(r"(?m)^(\s+path:)\s*\S+", rf"\1 {txt_folder}", text))
    assert cli_main(["my.yaml", *FAST, "--output.dir=own-txt"]) == 0
    # the same images captioned by metadata.jsonl instead of .txt files: the same captions, so the same run
    assert cli_main(["my.yaml", *FAST, "--output.dir=own-jsonl", f"--data.path={jsonl_folder}"]) == 0
    # and one caption for every image instead of their own: another run
    assert cli_main(["my.yaml", *FAST, "--output.dir=one-caption", "--data.prompt=a picture"]) == 0
    capsys.readouterr()
    own, explicit, single = losses(Path("own-txt")), losses(Path("own-jsonl")), losses(Path("one-caption"))
    assert len(own) == 3 and own == pytest.approx(explicit, abs=1e-6)
    assert own[1:] != pytest.approx(single[1:], abs=1e-4)
    assert json.loads(Path("own-txt/data_report.json").read_text())["used"] == 4
    card = Path("own-txt/README.md").read_text()
    assert "own captions" in card and str(txt_folder) in card


def test_a_card_on_the_command_line_replaces_the_recipes_source(capsys, txt_folder):
    data = print_config(capsys, ["quickstart", "--data.card=local_captionfolder", f"--data.path={txt_folder}"])["data"]
    assert (data["source"], data["path"], data["prompt"]) == ("captionfolder", str(txt_folder), None)


def test_a_source_on_the_command_line_drops_the_recipes_single_prompt(capsys, tmp_path, txt_folder):
    argv = ["quickstart", "--data.source=captionfolder", f"--data.path={txt_folder}"]
    data = print_config(capsys, argv)["data"]
    assert (data["source"], data["prompt"]) == ("captionfolder", None)
    out = tmp_path / "run"
    assert cli_main(argv + FAST + [f"--output.dir={out}"]) == 0
    assert json.loads((out / "data_report.json").read_text())["used"] == 4
    card = (out / "README.md").read_text()
    assert "mushroom" not in card and "instance_prompt" not in card and "own captions" in card


def test_a_prompt_over_a_folders_own_captions_is_announced(capsys, caplog, tmp_path, txt_folder):
    argv = [str(REPO / "recipes/my_folder.yaml"), f"--data.path={txt_folder}", "--data.prompt=a photo in [v] style"]
    assert cli_main(argv + FAST + [f"--output.dir={tmp_path / 'run'}"]) == 0
    said = capsys.readouterr()  # (the warning goes to the log: stderr, or pytest's caplog)
    lines = [line for line in (said.out + said.err + caplog.text).splitlines() if "data.prompt" in line]
    assert len(lines) == 1 and "replaces the own captions of 4 images" in lines[0]
    assert "every image captioned `a photo in [v] style`" in (tmp_path / "run/README.md").read_text()


def test_validation_prompts_accepts_one_string(capsys, tmp_path):
    got = print_config(capsys, ["quickstart", "--validation.prompts=a cat in [v] style"])["validation"]["prompts"]
    assert got == ["a cat in [v] style"]
    recipe = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())
    recipe["validation"]["prompts"] = "a house in [v] style"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert print_config(capsys, [str(tmp_path / "r.yaml")])["validation"]["prompts"] == ["a house in [v] style"]


# --------------------------------------------------------------------------------------------- no tracebacks


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, txt_folder) -> Path:
    """A 2-step tiny LoRA run on the own folder, with one validation prompt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = [str(REPO / "recipes/my_folder.yaml"), f"--data.path={txt_folder}", "--model.base=tiny",
            "--train.max_steps=2", "--train.checkpoint_every=2", "--validation.every=2", "--validation.steps=2",
            "--validation.prompts=[a picture number 1, a picture number 2]", "--output.loss_plot=false",
            f"--output.dir={out}"]
    assert cli_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> Path:
    """Files a user might pass by mistake."""
    root = tmp_path_factory.mktemp("junk")
    (root / "notes.safetensors").write_text("not a safetensors file")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "photo.png").write_text("a text file named .png")
    (root / "a-file").write_text("a file, not a folder")
    (root / "broken-run").mkdir()
    (root / "broken-run" / "recipe.yaml").write_text("model: {base: tiny\n")
    (root / "broken-run" / "adapter").mkdir()
    return root


SAMPLE = ["sample", "--base", "tiny", "--prompt", "x", "--steps", "2"]


@pytest.mark.parametrize("extra, fragments", [
    (["--adapter", "{junk}/notes.safetensors"], ["notes.safetensors is not a valid .safetensors file"]),
    (["--adapter", "{junk}/empty.safetensors"], ["empty.safetensors is not a valid .safetensors file"]),
    (["--image", "{junk}/photo.png"], ["--image", "photo.png is not an image"]),
    (["--image", "{run}/samples/step-2.png", "--mask", "{junk}/photo.png"], ["--mask", "photo.png is not an image"]),
    (["--out", "{junk}/a-file"], ["--out", "a-file is a file", "pass a folder"]),
    (["--out", "{junk}/a-file/samples"], ["--out", "a-file/samples", "not writable"]),
])
def test_sample_checks_its_inputs_before_loading(capsys, tmp_path, junk, finished_run, no_model_loading, extra,
                                                 fragments):
    argv = SAMPLE + [a.format(junk=junk, run=finished_run) for a in extra]
    line = one_error(capsys, cli_main(argv + ([] if "--out" in extra else ["--out", str(tmp_path / "o")])),
                     "amused-tune sample")
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, fragments", [
    (["merge", "{junk}/notes.safetensors", "--base", "tiny", "--out", "{tmp}/m"], ["is not a valid .safetensors file"]),
    (["merge", "{run}", "--out", "{junk}/a-file"], ["--out", "a-file is a file"]),
    (["merge", "{junk}/broken-run", "--out", "{tmp}/m"], ["broken-run/recipe.yaml", "not valid YAML", "line 2"]),
])
def test_merge_checks_its_inputs_before_loading(capsys, tmp_path, junk, finished_run, no_model_loading, argv,
                                                fragments):
    line = one_error(capsys, cli_main([a.format(junk=junk, run=finished_run, tmp=tmp_path) for a in argv]))
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv, prefix, fragments", [
    (["push", "{junk}/broken-run", "--repo-id", "me/x", "--dry-run"], "amused-tune",
     ["broken-run/recipe.yaml", "not valid YAML"]),
    (["styledrop-round2", "{run}", "--prompts", "{prompts}", "--out", "{junk}/a-file"], "amused-tune styledrop-round2",
     ["--out", "a-file is a file"]),
    (["styledrop-round2", "{run}", "--prompts", "{prompts}", "--steps", "0"], "amused-tune styledrop-round2",
     ["--steps must be >= 1"]),
    (["styledrop-round2", "{run}", "--prompts", "{prompts}", "--adapter-scales", "1", "0"],
     "amused-tune styledrop-round2", ["--adapter-scales must be > 0, got 1 0"]),
    (["styledrop-round2", "{run}", "--prompts", "{junk}"], "amused-tune styledrop-round2",
     ["--prompts", "is a folder"]),
    (["recipes", "cp", "quickstart", "{junk}/a-file/q.yaml"], "amused-tune recipes", ["a-file is a file"]),
    (["samlpe", "--prompt", "x"], "amused-tune", ["samlpe", "did you mean sample?"]),
    (["recipe", "cp", "quickstart", "q.yaml"], "amused-tune", ["did you mean recipes?"]),
])
def test_other_subcommands_answer_a_mistake_in_one_line(capsys, tmp_path, junk, finished_run, no_model_loading, argv,
                                                       prefix, fragments):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a house in [v] style\n")
    line = one_error(capsys, cli_main([a.format(junk=junk, run=finished_run, prompts=prompts) for a in argv]), prefix)
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("argv, fragments", [
    (["eval", "--dir", "{tmp}/no-such-pipeline"], ["--dir", "no-such-pipeline", "does not exist"]),
    (["eval", "--prompts", "0"], ["--prompts must be >= 1"]),
    (["eval", "--seeds", "0"], ["--seeds must be >= 1"]),
    (["eval", "--threads", "0"], ["--threads must be >= 1"]),
    (["eval", "--adapter", "{tmp}/no-such-run"], ["--adapter", "no-such-run", "does not exist"]),
])
def test_toy_eval_checks_its_arguments(capsys, tmp_path, argv, fragments):
    from amused_tune.toy.__main__ import main as toy_main

    line = one_error(capsys, toy_main([a.format(tmp=tmp_path) for a in argv]), "python -m amused_tune.toy")
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("text, fragments", [
    ("model:\n  base: tiny\ntrain: {max_steps: 3\n", ["bad.yaml", "not valid YAML", "line 4",
                                                      "the { opened at line 3, column 8 is never closed"]),
    ("model:\n\tbase: tiny\n", ["bad.yaml", "not valid YAML", "line 2", "YAML indents with spaces only"]),
    # an unclosed quote on line 6 of 9: the parser stops at the end of the file; the hint names the opening quote
    ('model:\n  base: tiny\ndata:\n  source: single_image\n  path: a.png\n  prompt: "a red circle\ntrain:\n'
     '  max_steps: 3\nx: 1\n', ["not valid YAML at line 10, column 1", "found unexpected end of stream",
                                "the quote opened at line 6, column 11 is never closed"]),
    ("validation:\n  prompts: [a, b\ntrain:\n  max_steps: 3\n", ["the [ opened at line 2, column 12 is never closed"]),
    ("model:\n    base: tiny\n  dtype: fp32\n", ["line 3", "usually an unclosed quote or bracket above the reported "
                                                  "line, or indentation"]),
    ("", ["bad.yaml", "is empty"]),
    ("- model\n- train\n", ["bad.yaml", "must be a mapping of sections"]),
])
def test_a_broken_recipe_file_is_named_with_its_line(capsys, tmp_path, text, fragments):
    (tmp_path / "bad.yaml").write_text(text)
    line = one_error(capsys, cli_main([str(tmp_path / "bad.yaml")]))
    for fragment in fragments:
        assert fragment in line, line


def test_a_broken_dataset_card_is_named_with_its_line(capsys, tmp_path):
    (tmp_path / "card.yaml").write_text("source: folder\npath: [photos\n")
    line = one_error(capsys, cli_main(["quickstart", f"--data.card={tmp_path / 'card.yaml'}", "--print_config"]))
    assert "card.yaml is not valid YAML at line 3" in line and "the [ opened at line 2, column 7 is never closed" in line


def test_an_unedited_my_folder_recipe_says_to_set_data_path_before_loading(capsys, no_model_loading):
    line = one_error(capsys, cli_main(["my_folder", "--model.base=tiny"]))
    assert "data.path=path/to/your/images does not exist: set data.path in the recipe" in line


@pytest.mark.parametrize("override, fragment", [
    ("--model.resolution=abc", "model.resolution=abc is not valid: model.resolution must be an integer or null"),
    ("--model.quantize=16bit", "model.quantize=16bit is not valid: model.quantize must be one of '8bit', '4bit' or null"),
    ("--data.path=", "data.path is empty: set it to your images"),
])
def test_an_optional_key_given_a_wrong_value_says_what_it_takes(capsys, no_model_loading, override, fragment):
    line = one_error(capsys, cli_main(["quickstart", override]))
    assert fragment in line and "Union" not in line, line


def test_a_single_image_recipe_pointed_at_a_folder_names_the_folder_sources(capsys, txt_folder):
    line = one_error(capsys, cli_main(["quickstart", f"--data.path={txt_folder}", "--model.base=tiny"]))
    assert "data.source=single_image needs one image file" in line and "--data.source=folder" in line


# --------------------------------------------------------------------------------------------- hints


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, with the Hub endpoint a closed local port (no real network is touched)."""
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return endpoint


def test_an_unreachable_hub_fails_fast_in_one_line_for_a_base(capsys, tmp_path, unreachable_hub):
    started = time.monotonic()
    line = one_error(capsys, cli_main(["quickstart", "--model.base=amused-tune-tests/not-cached",
                                       f"--output.dir={tmp_path / 'run'}"]))
    assert time.monotonic() - started < 8
    assert unreachable_hub in line and "hf download amused-tune-tests/not-cached --local-dir" in line
    assert "huggingface-cli" not in line


def test_an_unreachable_hub_fails_fast_in_one_line_for_a_dataset(capsys, tmp_path, unreachable_hub):
    started = time.monotonic()
    line = one_error(capsys, cli_main(["quickstart", "--model.base=tiny", "--data.source=hub",
                                       "--data.path=amused-tune-tests/no-data", f"--output.dir={tmp_path / 'run'}"]))
    assert time.monotonic() - started < 8
    assert "data.path=amused-tune-tests/no-data" in line and unreachable_hub in line and "cannot be reached" in line


# --------------------------------------------------------------------------------------------- feedback


def test_a_run_says_what_it_trains_then_a_smoothed_loss_and_how_to_sample(capsys, tmp_path, txt_folder):
    out = tmp_path / "run"
    argv = [str(REPO / "recipes/my_folder.yaml"), f"--data.path={txt_folder}", "--model.base=tiny",
            "--train.max_steps=4", "--train.batch_size=2", "--train.grad_accum=2", "--validation.every=4",
            "--validation.steps=2", "--validation.prompts=a picture number 3", "--output.loss_plot=false",
            f"--output.dir={out}"]
    assert cli_main(argv) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    banner = next(line for line in lines if line.startswith("train:"))
    for fragment in ("base tiny", "LoRA rank", "4 images", "4 steps", "effective batch 4 (2 x 2 accumulated",
                     str(out)):
        assert fragment in banner, banner
    assert any(line.startswith("loading base model tiny") for line in lines)
    assert any(line.startswith("samples: writing") and "step-4.png" in line for line in lines)
    recorded = losses(out)
    done = next(line for line in lines if line.startswith("done:"))
    mean = float(re.search(r"loss ([0-9.]+) \(mean of the last 4 steps\)", done)[1])
    assert mean == pytest.approx(sum(recorded) / 4, abs=1e-4)
    assert f"Final loss **{mean:.4f}** (mean of the last 4 steps" in (out / "README.md").read_text()
    assert lines[-1].startswith("next: amused-tune sample ")
    # the `next:` command runs as printed
    capsys.readouterr()
    nxt = shlex.split(lines[-1].removeprefix("next: "))[1:]
    assert cli_main(nxt) == 0
    assert "Loading weights" not in capsys.readouterr().err


def test_sample_says_what_it_is_doing(capsys, tmp_path):
    assert cli_main(SAMPLE + ["--out", str(tmp_path / "o")]) == 0
    stdout = capsys.readouterr().out
    assert "loading base model tiny" in stdout and "sampling 1 image (2 steps" in stdout


def test_library_noise_is_silenced_when_a_folder_base_loads_and_is_cast(capfd, tmp_path):
    # the toy base loads from a pipeline folder (transformers' "Loading weights" bar) and bf16 casts it (diffusers'
    # "modules that should be kept in float32" warning): neither reaches the terminal
    assert cli_main(["sample", "--base", "toy", "--prompt", "a red circle", "--steps", "1", "--dtype", "bf16",
                     "--out", str(tmp_path / "o")]) == 0
    said = capfd.readouterr()
    assert "loading base model toy" in said.out and (tmp_path / "o" / "grid.png").is_file()
    for noise in ("Loading weights", "float32", "it/s"):
        assert noise not in said.out + said.err, (noise, said.err[-2000:])


# --------------------------------------------------------------------------------------------- help


def test_top_level_help_starts_with_the_subcommands(capsys):
    assert cli_main(["--help"]) == 0
    head = capsys.readouterr().out.splitlines()[:16]
    for name in ("RECIPE.yaml", "sample", "recipes", "push", "merge", "styledrop-round2"):
        assert any(re.match(rf"\s+(amused-tune )?{re.escape(name)}\s+\S", line) for line in head), (name, head)


def test_help_piped_into_a_reader_that_stops_is_not_a_traceback():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "amused_tune.cli", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `amused-tune --help | head -1` once head has its line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


def test_recipe_help_shows_that_recipes_values(capsys):
    assert cli_main(["quickstart", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--train.max_steps MAX_STEPS Optimizer steps to train for. (type: int, default: 200)" in text
    assert "default: 0.002" in text  # optim.lr of the quickstart, not the schema's 0.0008


def test_sample_help_shows_the_defaults(capsys):
    assert cli_main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: samples)" in text and "(default: 1)" in text


# --------------------------------------------------------------------------------------------- pictures


def test_small_base_grids_are_upscaled_and_labelled(finished_run):
    grid = Image.open(finished_run / "samples" / "step-2.png")
    assert grid.size == (256, 512)  # a row per prompt (1 image each): 32 px tiles shown at 256 px
    assert json.loads(grid.text["prompts"]) == ["a picture number 1", "a picture number 2"]
    pixels = grid.convert("RGB").load()
    tile = [pixels[x, y] for x in range(256) for y in range(256)]
    assert len(set(tile)) > 2
    band = [pixels[x, y] for x in range(256) for y in range(236, 256)]
    assert sum(1 for p in band if min(p) > 200) > 20  # the label's white text on its dark band
    assert pixels[0, 255] == (20, 20, 20)


def test_the_model_cards_python_code_runs_as_written(finished_run, tmp_path, monkeypatch):
    card = (finished_run / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2  # diffusers and peft
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "<model card>", "exec"), {})
    assert Path("sample.png").is_file()


def test_a_full_fine_tunes_card_code_runs_as_written_on_a_built_in_base(tmp_path, monkeypatch, txt_folder):
    out = tmp_path / "full"
    assert cli_main([str(REPO / "recipes/my_folder.yaml"), f"--data.path={txt_folder}", *FAST, "--adapter.kind=full",
                     "--train.max_steps=1", "--train.checkpoint_every=1", f"--output.dir={out}"]) == 0
    blocks = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)
    assert len(blocks) == 1 and "load_components(\"tiny\")" in blocks[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "<model card>", "exec"), {})
    assert Image.open("sample.png").size == (32, 32)

