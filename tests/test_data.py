"""Data (issue 4): dataset cards, the four sources, bad samples, conversions, preprocessing and micro-conditioning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_images
from PIL import Image

from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.data.cards import DataError, load_card, resolve_config
from amused_tune.data.checks import to_rgb
from amused_tune.data.datasets import validated_dataset
from amused_tune.data.preflight import preflight
from amused_tune.data.preprocess import preprocess
from amused_tune.data.sources import open_source
from amused_tune.recipe import DataConfig, ModelConfig, OutputConfig, Recipe, TrainConfig
from amused_tune.train.loop import train

REPO = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, name: str = "run", steps: int = 2, **data) -> dict:
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    recipe = Recipe(model=ModelConfig(base="tiny"), data=DataConfig(**data),
                    train=TrainConfig(max_steps=steps, precision="fp32", batch_size=2, checkpoint_every=100),
                    output=OutputConfig(dir=str(tmp_path / name), loss_plot=False))
    return train(recipe)


def caption_folder(folder: Path, n: int = 3) -> Path:
    make_images(folder, n=n, captions=False)
    for i in range(n):
        (folder / f"img{i}.txt").write_text(f"a picture number {i}\n")
    return folder


def hub_folder(tmp_path: Path, n: int = 3, dict_split: bool = False) -> Path:
    """A Hub-like dataset saved with save_to_disk (Image feature + text column), built offline."""
    import datasets

    src = make_images(tmp_path / "hub_src", n=n)
    ds = datasets.Dataset.from_dict(
        {"picture": [str(src / f"img{i}.png") for i in range(n)], "caption": [f"picture {i}" for i in range(n)]},
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}),
    )
    out = tmp_path / "hub_ds"
    (datasets.DatasetDict({"train": ds}) if dict_split else ds).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("source", ["imagefolder", "captionfolder", "hub", "single_image"])
def test_each_source_trains_a_few_steps(tmp_path, source, cache):
    if source == "imagefolder":
        data = {"path": str(make_images(tmp_path / "data"))}
    elif source == "captionfolder":
        data = {"path": str(caption_folder(tmp_path / "data"))}
    elif source == "hub":
        data = {"path": str(hub_folder(tmp_path, dict_split=cache)), "image_column": "picture",
                "caption_column": "caption"}
    else:
        data = {"path": str(make_images(tmp_path / "data") / "img1.png"), "prompt": "a mushroom in [v] style"}
    summary = run(tmp_path, source=source, cache=cache, random_flip=True, **data)
    assert summary["step"] == 2
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped"] == 0 and report["used"] == (1 if source == "single_image" else 3 if source != "imagefolder" else 4)


def bad_folder(folder: Path) -> Path:
    """Four good images (one each grayscale, RGBA, palette), a 16-bit PNG and a CMYK JPEG (converted), and four bad
    samples: a truncated PNG, a text file named .jpg, an 8x8 image and an image that metadata.jsonl does not list."""
    make_images(folder, n=4)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), "RGB")
    noise.save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("this is not a JPEG\n")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(folder / "deep16.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / "tiny8.png")  # a photo
    Image.new("L", (40, 40), 128).save(folder / "gray.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(folder / "rgba.png")
    Image.new("RGB", (40, 40), (0, 90, 0)).quantize(8).save(folder / "palette.png")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / "uncaptioned.png")
    for name in ("truncated.png", "notes.jpg", "deep16.png", "cmyk.jpg", "tiny8.png", "gray.png", "rgba.png",
                 "palette.png"):
        rows.insert(0 if name == "truncated.png" else len(rows), {"file_name": name, "text": f"a {name}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("cache", [True, False])
def test_bad_samples_are_skipped_and_counted(tmp_path, caplog, cache):
    folder = bad_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="amused_tune"):
        summary = run(tmp_path, source="imagefolder", path=str(folder), cache=cache)
    assert summary["step"] == 2
    assert "skipped 4 of 13 samples" in caplog.text
    assert "converted 5 images to RGB" in caplog.text
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    bad = {Path(b["sample"]).name: b["reason"] for b in report["bad"]}
    assert set(bad) == {"truncated.png", "notes.jpg", "tiny8.png", "uncaptioned.png"}
    assert "not an image" in bad["notes.jpg"] and "smaller than 32" in bad["tiny8.png"]
    assert bad["uncaptioned.png"] == "no caption" and "unreadable" in bad["truncated.png"]
    assert report["converted"] == {"16-bit": 1, "CMYK": 1, "grayscale": 1, "palette": 1,
                                   "RGBA (transparency over white)": 1}


@pytest.mark.parametrize("cache", [True, False])
def test_bad_sample_with_error_stops_before_training_naming_the_file(tmp_path, cache):
    folder = bad_folder(tmp_path / "data")
    with pytest.raises(DataError, match=r"truncated\.png: unreadable image"):
        run(tmp_path, source="imagefolder", path=str(folder), cache=cache, on_bad_sample="error")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_cli_prints_one_line_naming_the_bad_file(tmp_path, capsys):
    folder = bad_folder(tmp_path / "data")
    recipe = {"model": {"base": "tiny"}, "train": {"max_steps": 1, "precision": "fp32"},
              "data": {"source": "imagefolder", "path": str(folder), "on_bad_sample": "error",
                       "cache_dir": str(tmp_path / "cache")},
              "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_main([str(tmp_path / "r.yaml")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("amused-tune: error: ") and "truncated.png" in errors[0]


def test_long_caption_is_truncated_with_one_warning(tmp_path, caplog):
    folder = make_images(tmp_path / "data", n=2)
    long = "a very long caption " * 8
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": long}) + "\n"
                                                   for i in range(2)))
    with caplog.at_level(logging.WARNING, logger="amused_tune"):
        run(tmp_path, source="imagefolder", path=str(folder))
    warnings = [r for r in caplog.records if "longer than 77 tokens" in r.getMessage()]
    assert len(warnings) == 1 and "1 captions" in warnings[0].getMessage()


def test_empty_caption_and_missing_txt_are_bad_samples(tmp_path):
    folder = caption_folder(tmp_path / "data", n=3)
    (folder / "img1.txt").write_text("  \n")
    (folder / "img2.txt").unlink()
    cfg = resolve_config(DataConfig(source="captionfolder", path=str(folder)))
    dataset, report = validated_dataset(cfg, 32)
    assert len(dataset) == 1 and sorted(r for _, r in report.bad) == ["empty caption", "no caption"]
    with pytest.raises(DataError, match="no usable samples"):
        validated_dataset(resolve_config(DataConfig(source="captionfolder", path=str(folder), min_image_size=64,
                                                    pixel_art=False)), 32)  # (pixel art is never too small)


@pytest.mark.parametrize("source, caption", [("captionfolder", "the txt caption"),
                                             ("imagefolder", "the metadata caption"),
                                             ("folder", "the metadata caption")])
def test_folder_with_txt_captions_and_a_metadata_jsonl_is_read_by_each_folder_source(tmp_path, source, caption):
    """Both caption layouts in one folder: every folder source accepts it and reads its own captions (captionfolder
    the .txt, imagefolder and folder the metadata.jsonl); the preflight refuses none of them."""
    folder = make_images(tmp_path / "both", n=2, captions=False)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png",
                                                               "text": "the metadata caption"}) + "\n"
                                                   for i in range(2)))
    for i in range(2):
        (folder / f"img{i}.txt").write_text("the txt caption")
    records = preflight(DataConfig(source=source, path=str(folder))).parts[0].source().records
    assert [(Path(r.ref).name, r.caption) for r in records] == [("img0.png", caption), ("img1.png", caption)]


def test_captionfolder_without_txt_captions_is_refused_unless_data_prompt_captions_it(tmp_path):
    folder = make_images(tmp_path / "bare", n=2, captions=False)
    with pytest.raises(DataError) as refused:
        preflight(DataConfig(source="captionfolder", path=str(folder)))
    assert str(refused.value) == (f"data.path={folder} has no .txt captions, which data.source=captionfolder reads: add a "
                       "same-named .txt per image, or set data.prompt to caption every image alike")
    listed = preflight(DataConfig(source="captionfolder", path=str(folder), prompt="a square")).parts[0].source()
    assert [Path(r.ref).name for r in listed.records] == ["img0.png", "img1.png"]  # captioned by data.prompt


def test_conversions_keep_the_picture():
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    rgb, kind = to_rgb(deep)
    assert kind == "16-bit" and np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped
    rgb, kind = to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))
    assert np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    rgb, kind = to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))
    assert kind == "CMYK" and np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]


def test_preprocess_micro_conditioning_from_true_size_and_crop():
    image = Image.new("RGB", (128, 64))
    image.paste((255, 0, 0), (0, 0, 64, 64))  # left half red
    pixels, micro = preprocess(image, 32)
    assert pixels.shape == (3, 32, 32) and micro.tolist() == [128, 64, 0, 16, 6.0]  # resized 64x32, centre crop
    flipped, micro_f = preprocess(image, 32, flip=True)
    assert torch.equal(flipped, pixels.flip(-1)) and micro_f[3] == 16
    import random

    _, micro_r = preprocess(image, 32, random.Random(1))
    assert 0 <= micro_r[3] <= 32 and micro_r[2] == 0


def test_cards_resolve_and_recipes_override(tmp_path):
    nouns = resolve_config(DataConfig(card="nouns"))
    assert (nouns.source, nouns.path, nouns.split, nouns.image_column, nouns.caption_column) == (
        "hub", "m1guelpf/nouns", "train", "image", "text")
    minecraft = resolve_config(DataConfig(card="minecraft", caption_column="caption", random_flip=True))
    assert minecraft.prompt_prefix == "minecraft " and minecraft.caption_column == "caption" and minecraft.random_flip
    assert load_card("styledrop")["prompt"] == "A mushroom in [V] style"
    with pytest.raises(DataError, match="available: .*nouns"):
        resolve_config(DataConfig(card="no_such_card"))
    (tmp_path / "c.yaml").write_text("source: imagefolder\npath: x\ncolour: blue\n")
    with pytest.raises(DataError, match="unknown key.*colour"):
        resolve_config(DataConfig(card=str(tmp_path / "c.yaml")))
    with pytest.raises(DataError, match="data.source and data.path"):
        resolve_config(DataConfig(card="local_imagefolder"))
    folder = make_images(tmp_path / "mine", n=2)
    assert len(validated_dataset(resolve_config(DataConfig(card="local_imagefolder", path=str(folder))), 32)[0]) == 2


def test_every_card_is_complete_and_names_existing_recipes():
    for path in sorted((REPO / "datasets_cards").glob("*.yaml")):
        card = load_card(str(path))
        assert {"name", "description", "licence", "source", "recipes"} <= set(card), path.name
        for name in card["recipes"]:
            assert (REPO / "recipes" / f"{name}.yaml").is_file(), (path.name, name)


def test_hub_dataset_not_cached_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="m1guelpf/nouns: could not load the dataset"):
        open_source(resolve_config(DataConfig(card="nouns")))


def test_hub_columns_and_splits_are_checked(tmp_path):
    path = str(hub_folder(tmp_path, n=2, dict_split=True))
    with pytest.raises(DataError, match="has columns picture, caption"):
        open_source(resolve_config(DataConfig(source="hub", path=path)))
    with pytest.raises(DataError, match="has splits train"):
        open_source(resolve_config(DataConfig(source="hub", path=path, split="validation", image_column="picture")))


def test_quickstart_data_still_loads():
    recipe, _, _ = parse_recipe([str(REPO / "recipes" / "quickstart.yaml")])
    dataset, report = validated_dataset(resolve_config(recipe.data), 32)
    item = dataset[0]
    assert item["pixels"].shape == (3, 32, 32) and item["prompt"] == "a yellow square on a blue background in [v] style" and not report.bad
