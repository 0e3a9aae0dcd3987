"""The second hour, past the quickstart: a run's weights know their base and the sampling settings they were
validated with, so `sample` and `merge` need no `--base`, a pushed-then-downloaded adapter still knows them, a
merged folder samples at its defaults exactly as base + adapter do, and command-line keys are exact.

The runs here are the quickstart recipe on the toy base, cut to 3 steps (what is recorded does not depend on how
long it trained).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import reset_accelerate
from PIL import Image

from amused_tune.cli import main as cli_main
from helpers import TOKEN, FakeHub, push
from helpers import no_model_loading  # noqa: F401 (a fixture: loading a base model fails the test)

PROMPT = "a red circle on a white background in [v] style"
SHORT = ["--train.max_steps=3", "--train.checkpoint_every=3", "--output.loss_plot=false",
         "--validation.images_per_prompt=1", "--styledrop.rounds=1"]  # one round: what a run records is the same


def toy_run(out: Path, *extra: str) -> Path:
    assert cli_main(["quickstart", *SHORT, f"--output.dir={out}", *extra]) == 0
    reset_accelerate()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return toy_run(tmp_path_factory.mktemp("second-hour") / "quickstart-lora")


def sample(capsys, tmp_path: Path, name: str, *args: str, prompts=(PROMPT,)) -> tuple[list[np.ndarray], str]:
    """Run `amused-tune sample` (2 images per prompt); the images' pixels and what it said (stdout + stderr)."""
    out = tmp_path / name
    argv = ["sample", *args, "--num-images", "2", "--out", str(out)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert cli_main(argv) == 0
    said = capsys.readouterr()
    files = sorted(out.glob("0*-seed*.png"))
    assert len(files) == 2 * len(prompts)
    return [np.asarray(Image.open(f).convert("RGB")) for f in files], said.out + said.err


def png_settings(folder: Path) -> dict:
    return dict(Image.open(next(folder.glob("000-seed*.png"))).text)


# --------------------------------------------------------------------------------------------- what a run records


def test_a_run_records_its_base_and_validated_settings_beside_the_weights_and_in_the_file(run):
    from amused_tune.model.provenance import read_record

    record = json.loads((run / "adapter" / "amused_tune.json").read_text())
    assert record["base"] == "toy"
    expected = {"guidance": 2.0, "guidance_schedule": "constant", "steps": 12, "temperature": [2.0, 0.0]}
    assert {k: record["sampling"][k] for k in expected} == expected  # the toy's sampling.json: what validation used
    lone = read_record(run / "adapter" / "pytorch_lora_weights.safetensors")  # the file's own metadata
    assert lone == record
    card = (run / "README.md").read_text()
    assert "guidance 2.0" in card and "amused_tune.json" in card
    assert "guidance_scale=2.0, num_inference_steps=12, temperature=(2.0, 0.0)" in card  # diffusers' own call
    # every setting is listed, and what plain diffusers cannot apply is said (the toy truncates at min_p 0.1)
    assert "temperature 2.0 -> 0.0, min_p 0.1, top_k 0" in card
    assert "`AmusedPipeline` takes guidance, steps and temperature" in card and "cannot apply `min_p` 0.1" in card


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_a_recipes_own_validation_settings_are_what_is_recorded(tmp_path):
    run = toy_run(tmp_path / "g3", "--validation.guidance=3.0", "--validation.steps=8")
    record = json.loads((run / "adapter" / "amused_tune.json").read_text())
    assert (record["sampling"]["guidance"], record["sampling"]["steps"]) == (3.0, 8)


@pytest.mark.slow  # learning check or real-size shapes: in the full suite (`pytest --full`)
def test_a_full_fine_tune_records_its_base_beside_its_transformer(tmp_path):
    run = toy_run(tmp_path / "full", "--adapter.kind=full", "--validation.prompts=[]")
    assert json.loads((run / "transformer" / "amused_tune.json").read_text())["base"] == "toy"


# --------------------------------------------------------------------------------------------- sample


def test_sample_without_base_uses_the_recorded_base_and_its_defaults(run, tmp_path, capsys):
    _, said = sample(capsys, tmp_path, "no-base", "--adapter", str(run))
    assert f"base: toy (recorded by the adapter {run})" in said
    assert "guidance 2.0" in said and "Traceback" not in said
    settings = png_settings(tmp_path / "no-base")
    assert (settings["base"], float(settings["guidance"]), int(settings["steps"])) == ("toy", 2.0, 12)


def test_a_pushed_then_downloaded_adapter_still_knows_its_base(run, tmp_path, capsys):

    hub = FakeHub({TOKEN: "alice"}).start()
    try:
        result = push(run, "--repo-id", "alice/frame-style", endpoint=hub.endpoint, home=tmp_path / "hf-home")
        assert result.returncode == 0, result.stderr
        files = hub.repos["alice/frame-style"].files
    finally:
        hub.stop()
    assert json.loads(files["amused_tune.json"])["base"] == "toy"
    download = tmp_path / "frame-style"  # what `hf download alice/frame-style --local-dir frame-style` writes
    for name, data in files.items():
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        (download / name).write_bytes(data)
    assert "base_model: toy" in (download / "README.md").read_text()
    downloaded, said = sample(capsys, tmp_path, "downloaded", "--adapter", str(download))
    assert f"base: toy (recorded by the adapter {download})" in said and "guidance 2.0" in said
    local, _ = sample(capsys, tmp_path, "local", "--adapter", str(run))
    assert all(np.array_equal(a, b) for a, b in zip(downloaded, local))


def test_another_base_is_allowed_with_a_warning_and_a_misfit_names_the_recorded_base(run, tmp_path, capsys):
    rc = cli_main(["sample", "--base", "tiny", "--adapter", str(run), "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"warning: {run} was trained on toy, not on tiny (--base)" in err
    error = [line for line in err.splitlines() if line.startswith("amused-tune sample: error:")]
    assert len(error) == 1 and "it was trained on toy: pass --base toy" in error[0], err


# --------------------------------------------------------------------------------------------- merge


def test_a_merged_toy_run_samples_at_its_defaults_exactly_as_base_plus_adapter(run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert cli_main(["merge", str(run), "--out", str(merged)]) == 0
    assert f"base: toy (recorded by {run})" in capsys.readouterr().out
    assert json.loads((merged / "sampling.json").read_text())["guidance"] == 2.0
    prompts = (PROMPT, "a green triangle on a black background in [v] style")
    fused, said = sample(capsys, tmp_path, "fused", "--base", str(merged), prompts=prompts)
    assert "guidance 2.0" in said
    unfused, _ = sample(capsys, tmp_path, "unfused", "--base", "toy", "--adapter", str(run), prompts=prompts)
    assert len(fused) == 4 and all(np.array_equal(a, b) for a, b in zip(fused, unfused))
    assert float(png_settings(tmp_path / "fused")["guidance"]) == float(png_settings(tmp_path / "unfused")["guidance"])


def test_merge_of_an_adapter_that_records_nothing_asks_for_base(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"  # e.g. written by another trainer: weights, no metadata
    save_file(load_file(run / "adapter" / "pytorch_lora_weights.safetensors"), bare)
    assert cli_main(["merge", str(bare), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no base model" in err[0] and "pass --base" in err[0]


# --------------------------------------------------------------------------------------------- exact keys


@pytest.mark.parametrize("argv, prefix, fragment", [
    (["quickstart", "--train.max_s=3", "--print_config"], "amused-tune",
     "train.max_s is not a recipe key: did you mean train.max_steps?"),
    (["quickstart", "--train.max_s", "3", "--print_config"], "amused-tune",
     "train.max_s is not a recipe key: did you mean train.max_steps?"),
    (["sample", "--prompt", "x", "--num", "2"], "amused-tune sample",
     "unrecognized option --num: did you mean --num-images?"),
    (["merge", "run", "--out", "m", "--sca", "2"], "amused-tune merge", "did you mean --scale?"),
])
def test_command_line_keys_are_exact(capsys, argv, prefix, fragment):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prefix}: error: ") and fragment in err[0], err


# --------------------------------------------------------------------------------------------- data.path vs data.source


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("captioned") / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    return folder


@pytest.mark.parametrize("argv, fragments", [
    (["my_folder", "--data.path={image}"], ["is a file, but data.source=folder needs a folder",
                                            "use --data.source=single_image --data.prompt="]),
    (["quickstart", "--data.path={jsonl}"], ["is a folder, but data.source=single_image needs one image file",
                                             "use --data.source=folder (it has a metadata.jsonl"]),
    (["quickstart", "--data.path={txt}"], ["use --data.source=folder (it has .txt captions"]),
    (["my_folder", "--data.source=imagefolder", "--data.path={txt}"], ["has no metadata.jsonl",
                                                                       "use --data.source=folder"]),
    (["my_folder", "--data.source=captionfolder", "--data.path={jsonl}"], ["has no .txt captions",
                                                                           "use --data.source=folder"]),
])
def test_data_path_is_checked_against_data_source_before_any_model_loads(capsys, no_model_loading, captioned, argv,
                                                                         fragments):
    kit = Path(__file__).resolve().parent.parent / "assets"
    paths = dict(image=kit / "quickstart" / "toy_style.png", jsonl=kit / "toy_concept", txt=captioned)
    assert cli_main([a.format(**paths) for a in argv] + ["--model.base=toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(f in err[0] for f in fragments), err


# --------------------------------------------------------------------------------------------- my_folder


def test_my_folders_header_command_is_the_toy_on_a_folder_the_kit_ships():
    from amused_tune.cli.recipes import header

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "my_folder.yaml"
    command = next(line for line in header(recipe) if line.startswith("# command: ")).removeprefix("# command: ")
    assert command == ("amused-tune recipes/my_folder.yaml --model.base=toy --data.path=assets/toy_concept "
                       "--train.max_steps=20")  # tests/test_readme_commands.py runs it, from the README
    assert (recipe.parent.parent / "assets" / "toy_concept" / "metadata.jsonl").is_file()


def kit_captions() -> list[str]:
    meta = Path(__file__).resolve().parent.parent / "assets" / "toy_concept" / "metadata.jsonl"
    return [json.loads(line)["text"] for line in meta.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("prompts, expected_prompts, warned", [
    ([], "first two captions", None),
    (["--validation.prompts=a photo in [v] style"], ["a photo in [v] style"], "photo, [v], style"),
])
def test_validation_prompts_come_from_the_captions_and_unknown_words_are_warned(tmp_path, capsys, prompts,
                                                                                 expected_prompts, warned):
    import yaml

    out = tmp_path / "run"
    assert cli_main(["my_folder", "--model.base=tiny", "--data.path=assets/toy_concept", "--train.max_steps=1",
                     "--validation.steps=1", "--output.loss_plot=false", f"--output.dir={out}", *prompts]) == 0
    reset_accelerate()
    said = capsys.readouterr()
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())["validation"]["prompts"]
    if expected_prompts == "first two captions":
        assert recorded == list(dict.fromkeys(kit_captions()))[:2]
        assert "validation: no prompts given: the data's first captions" in said.out
    else:
        assert recorded == expected_prompts
    warnings = [line for line in said.err.splitlines() if line.startswith("warning: validation prompt")]
    assert len(warnings) == (1 if warned else 0), said.err
    if warned:
        assert f"uses {warned}, which no caption of data.path=assets/toy_concept contains" in warnings[0]


def test_sample_help_has_three_examples_and_describes_every_option(capsys):
    from amused_tune.cli.sample import build_parser

    parser = build_parser()
    undescribed = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert undescribed == []
    assert cli_main(["sample", "--help"]) == 0
    text = capsys.readouterr().out
    examples = text.split("examples:", 1)[1]
    assert len([line for line in examples.splitlines() if line.startswith("  amused-tune sample ")]) == 3
    assert "--adapter runs/quickstart-lora" in examples and "'tiny' (random weights" in " ".join(text.split())
