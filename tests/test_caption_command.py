"""`amused-tune caption FOLDER` with a tiny random BLIP (BlipForConditionalGeneration, the default captioner's
architecture) built in code: 5 images -> 5 .txt files that a training run reads; unreadable images are named and
the rest captioned; existing captions kept unless --overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from amused_tune.cli import main as cli_main
from amused_tune.cli.caption import caption_folder
from amused_tune.train.loop import train
from conftest import make_images
from helpers import captioner, recipe_for  # noqa: F401  (captioner: a fixture)



def five_images(folder):
    make_images(folder, n=5, captions=False)
    return folder


def test_five_images_get_five_captions_that_a_run_trains_on(tmp_path, captioner, capsys):
    folder = five_images(tmp_path / "imgs")
    assert cli_main(["caption", str(folder), "--model", captioner, "--trigger", "sks", "--prefix", "a picture of ",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "5 captions written, 0 kept" in out
    txts = sorted(folder.glob("*.txt"))
    assert len(txts) == 5
    assert all(t.read_text().startswith("sks, a picture of red") for t in txts)

    recipe = recipe_for(tmp_path / "run", folder, max_steps=1)
    recipe.data.source = "folder"
    summary = train(recipe)
    assert summary["step"] == 1
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["samples"], report["used"], report["skipped"]) == (5, 5, 0)  # every image read with its caption


def test_existing_captions_are_kept_unless_overwrite(tmp_path, captioner):
    folder = five_images(tmp_path / "imgs")
    (folder / "img0.txt").write_text("my own caption")
    result = caption_folder(folder, captioner, prefix="a ", max_new_tokens=2, progress=False)
    assert len(result.written) == 4 and [p.name for p in result.kept] == ["img0.png"]
    assert (folder / "img0.txt").read_text() == "my own caption"
    result = caption_folder(folder, captioner, prefix="a ", max_new_tokens=2, overwrite=True, progress=False)
    assert len(result.written) == 5 and (folder / "img0.txt").read_text().startswith("a red")


def test_unreadable_images_are_named_and_the_rest_captioned(tmp_path, captioner, capsys):
    folder = five_images(tmp_path / "imgs")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 40)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:40])
    assert cli_main(["caption", str(folder), "--model", captioner, "--prefix", "a ", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"unreadable, not captioned: {folder / 'broken.png'}" in out
    assert f"unreadable, not captioned: {folder / 'cut.jpg'}" in out
    assert "5 captions written, 0 kept (--overwrite replaces them), 2 unreadable images" in out
    assert not (folder / "broken.txt").exists()


def test_a_folder_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["caption", str(tmp_path / "nothing")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amused-tune")]
    assert len(err) == 1 and "is not a folder of images" in err[0]
