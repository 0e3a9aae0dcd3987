"""The token / text-embedding cache (issue 4): no encoder in a training step, reuse, invalidation, resume."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
from conftest import make_images
from diffusers import UVit2DModel, VQModel
from PIL import Image
from transformers import CLIPTextModelWithProjection

from amused_tune.data import cache
from amused_tune.data.cards import DataError, resolve_config
from amused_tune.data.pixel_art import grid_for
from amused_tune.data.checks import min_image_size
from amused_tune.data.preprocess import preprocess
from amused_tune.data.sources import open_source
from amused_tune.model.bases import build_tiny, encode_images
from amused_tune.recipe import AdapterConfig, DataConfig, ModelConfig, OutputConfig, Recipe, TrainConfig
from amused_tune.train.loop import train


def recipe(tmp_path: Path, folder: Path, name: str, text_encoder: bool = False, **data) -> Recipe:
    return Recipe(model=ModelConfig(base="tiny"),
                  data=DataConfig(source="imagefolder", path=str(folder), cache_dir=str(tmp_path / "cache"), **data),
                  adapter=AdapterConfig(rank=4, alpha=4, text_encoder=text_encoder),
                  train=TrainConfig(max_steps=2, batch_size=2, precision="fp32", checkpoint_every=100),
                  output=OutputConfig(dir=str(tmp_path / name), loss_plot=False))


def test_training_steps_never_call_the_encoders_and_a_second_run_encodes_nothing(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "data", n=4)
    calls = []
    for cls, name in ((VQModel, "encode"), (CLIPTextModelWithProjection, "forward"), (UVit2DModel, "forward")):
        original = getattr(cls, name)

        def spy(self, *args, _original=original, _name=f"{cls.__name__}.{name}", **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    train(recipe(tmp_path, folder, "run1", random_flip=True))
    first_step = calls.index("UVit2DModel.forward")
    assert "VQModel.encode" in calls[:first_step] and "CLIPTextModelWithProjection.forward" in calls[:first_step]
    assert set(calls[first_step:]) == {"UVit2DModel.forward"}  # every training step: the U-ViT only

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran although everything is cached")

    monkeypatch.setattr(VQModel, "encode", boom)
    monkeypatch.setattr(CLIPTextModelWithProjection, "forward", boom)
    assert train(recipe(tmp_path, folder, "run2", random_flip=True))["step"] == 2


def test_encoders_leave_the_accelerator_after_caching(tmp_path):
    comps = build_tiny()
    train(recipe(tmp_path, make_images(tmp_path / "data", n=2), "run"), components=comps)
    assert next(comps.vqvae.parameters()).device.type == "cpu"
    assert next(comps.text_encoder.parameters()).device.type == "cpu"


def cached(tmp_path: Path, folder: Path, comps=None, resolution: int = 32, **data):
    cfg = resolve_config(DataConfig(source="imagefolder", path=str(folder), cache_dir=str(tmp_path / "cache"), **data))
    return cache.cached_dataset(cfg, resolution, comps or build_tiny(), show_progress=False)


def token_dirs(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "cache").glob("tokens-*")}


def test_random_flip_caches_both_variants(tmp_path):
    folder = make_images(tmp_path / "data", n=2)
    comps = build_tiny()
    dataset, empty, _ = cached(tmp_path, folder, comps, random_flip=True)
    assert dataset.tokens.shape == (2, 2, 8, 8) and empty[0].shape == (1, 77, 32)
    image = Image.open(folder / "img0.png").convert("RGB")
    pixels, micro = preprocess(image, 32, grid=grid_for(image, "auto"))  # (flat blocks: pixel art, enlarged x8)
    assert torch.equal(dataset.tokens[0, 0].long(), encode_images(comps.vqvae, pixels[None])[0])
    assert torch.equal(dataset.tokens[0, 1].long(), encode_images(comps.vqvae, pixels.flip(-1)[None])[0])
    seen = {int(torch.equal(dataset[0]["tokens"], dataset.tokens[0, 1].long())) for _ in range(40)}
    assert seen == {0, 1}  # training draws both
    item = dataset[1]
    assert set(item) == {"tokens", "micro_conds", "prompt", "hidden", "pooled"} and item["hidden"].shape == (77, 32)


def test_random_crops_are_cached_per_image(tmp_path):
    folder = make_images(tmp_path / "data", n=1, size=40)
    Image.new("RGB", (96, 40), (200, 10, 10)).save(folder / "img0.png")  # wide: crops can differ
    dataset, _, _ = cached(tmp_path, folder, center_crop=False, random_crops=3)
    lefts = dataset.micro[0, :, 3].tolist()
    assert dataset.tokens.shape[1] == 3 and len(set(lefts)) > 1 and all(0 <= x <= 77 - 32 for x in lefts)
    again, _, _ = cached(tmp_path, folder, center_crop=False, random_crops=3)
    assert again.micro[0, :, 3].tolist() == lefts  # the same crops every run


def test_changed_data_model_or_preprocessing_invalidates(tmp_path):
    folder = make_images(tmp_path / "data", n=2, size=64)
    cached(tmp_path, folder)
    cached(tmp_path, folder)
    assert len(token_dirs(tmp_path)) == 1
    cached(tmp_path, folder, comps=build_tiny(seed=1))  # another VQ model
    cached(tmp_path, folder, random_flip=True)  # other preprocessing
    cached(tmp_path, folder, resolution=64)  # another resolution
    Image.new("RGB", (64, 64), (1, 1, 1)).save(folder / "img1.png")  # changed image
    os.utime(folder / "img1.png", ns=(1, 1))
    cached(tmp_path, folder)
    assert len(token_dirs(tmp_path)) == 5


def test_interrupted_encoding_resumes_at_the_first_missing_shard(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "data", n=6)
    monkeypatch.setattr(cache, "SHARD", 2)
    encoded, real = [], cache.encode_shard

    def crash_on_third(source, records, *args):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(records[0].key)
        return real(source, records, *args)

    monkeypatch.setattr(cache, "encode_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cached(tmp_path, folder)
    (shards,) = [list(p.iterdir()) for p in (tmp_path / "cache").glob("tokens-*")]
    assert sorted(p.name for p in shards if not p.name.startswith(".")) == [
        "shard-00000.safetensors", "shard-00001.safetensors"]
    encoded.clear()
    monkeypatch.setattr(cache, "encode_shard", lambda source, records, *args: (encoded.append(1), real(source, records, *args))[1])
    dataset, _, _ = cached(tmp_path, folder)
    assert len(encoded) == 1 and len(dataset) == 6
    assert dataset.prompts == [f"a picture number {i}" for i in range(6)]


def test_text_encoder_training_caches_tokens_only(tmp_path):
    folder = make_images(tmp_path / "data", n=2)
    summary = train(recipe(tmp_path, folder, "run", text_encoder=True))
    assert summary["step"] == 2
    assert token_dirs(tmp_path) and not list((tmp_path / "cache").glob("text-*"))


def test_error_mode_refuses_a_cache_built_with_skip(tmp_path):
    folder = make_images(tmp_path / "data", n=2)
    (folder / "broken.png").write_text("no")
    dataset, _, report = cached(tmp_path, folder)
    assert len(dataset) == 2 and len(report.bad) == 1
    with pytest.raises(DataError, match="broken.png: no caption"):
        cached(tmp_path, folder, on_bad_sample="error")


def test_source_lists_without_decoding(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "data", n=3)
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    source = open_source(resolve_config(DataConfig(source="imagefolder", path=str(folder))))
    assert len(source.records) == 3


def two_column_images(folder: Path, n: int = 4) -> Path:
    """n wide images (48x32: random crops differ) whose metadata has two caption columns, `text` and `alt`."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (48, 32), (40 * i, 200 - 40 * i, 90))
        for x in range(4 + 6 * i, 14 + 6 * i):
            for y in range(8, 24):
                img.putpixel((x, y), (255, 255, 255))
        img.save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a square number {i}", "alt": f"a block at {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# (the earlier run's value, the later run's value) of each data key that changes captions or pixels
CHANGED_KEYS = {
    "prompt": ("a photo in sks style", "a drawing in sks style"),
    "caption_column": ("text", "alt"),
    "prompt_template": ("{caption}", "a painting of {caption}"),
    "prompt_prefix": ("", "sks, "),
    "center_crop": (False, True),
    "random_flip": (True, False),
}


@pytest.mark.parametrize("key", sorted(CHANGED_KEYS))
def test_a_run_sharing_the_cache_with_another_recipe_trains_as_without_cache(tmp_path, key):
    from amused_tune.train.outputs import read_metrics

    folder = two_column_images(tmp_path / "data")
    earlier, later = CHANGED_KEYS[key]

    def run(name: str, value, use_cache: bool) -> list[float]:
        r = recipe(tmp_path, folder, name, **{key: value, "cache": use_cache})
        r.train.max_steps, r.train.log_every = 3, 1
        train(r)
        return [row["loss"] for row in read_metrics(tmp_path / name / "metrics.jsonl")]

    run("earlier", earlier, True)  # fills the shared cache with the other recipe's captions / pixels
    shared = run("later", later, True)
    uncached = run("later-uncached", later, False)
    assert len(shared) == 3 and shared == pytest.approx(uncached, rel=1e-6, abs=0)  # (float noise of batching)


# --------------------------------------------------------------------------------------------- the key, in one place

# a changed value of each data setting that applies to an imagefolder: (base value, changed value)
PERTURBED = {
    "caption_column": ("text", "alt"), "prompt": (None, "a photo in sks style"), "prompt_prefix": ("", "sks, "),
    "prompt_template": ("{caption}", "a painting of {caption}"), "center_crop": (False, True),
    "random_flip": (False, True), "min_image_size": (None, 0), "random_crops": (2, 3), "cache": (True, False),
    "cache_dir": ("a", "b"), "on_bad_sample": ("skip", "error"), "num_workers": (0, 2),
    "card": (None, "local_imagefolder"), "path": ("data", "moved"), "trigger_word": (None, "sks"),
    "shuffle_tags": (False, True), "keep_tags": (0, 1), "caption_dropout": (None, 0.5),
    "pixel_art": (None, False), "background": ("#ffffff", "#203040"),
    "colour_variants": (2, 0), "colours": (None, {"red": (220, 30, 30), "white": (245, 245, 245)}),
}
# hub, the source kind (covered by its identity), and a list of sources (each one cached under its own key)
NOT_FOR_AN_IMAGEFOLDER = {"source", "split", "image_column", "sources"}


def cache_contents(cfg, folder: Path, comps) -> tuple:
    """What a token shard holds for these settings (tokens, micro_conds, captions), and the finished prompts."""
    from amused_tune.data.preprocess import make_prompt

    source = open_source(cfg)
    tensors, meta = cache.encode_shard(source, source.records, cfg, 32, min_image_size(cfg, 32), comps,
                                       types.SimpleNamespace(update=lambda n: None))
    return tensors["tokens"], tensors["micro_conds"], meta["captions"]


def test_the_token_key_covers_every_data_setting_that_changes_pixels_or_captions(tmp_path):
    """Each data setting, changed alone: if what the token cache would hold changes, the key changes. And every
    DataConfig setting is either in the key or listed, with why, in NOT_IN_TOKEN_KEY."""
    import dataclasses
    import shutil

    folder = two_column_images(tmp_path / "data")
    shutil.copytree(folder, tmp_path / "moved", copy_function=shutil.copy2)
    comps = build_tiny()
    names = {f.name for f in dataclasses.fields(DataConfig)}
    assert set(PERTURBED) | NOT_FOR_AN_IMAGEFOLDER == names, "a new data setting: add it to PERTURBED"
    assert set(cache.NOT_IN_TOKEN_KEY) <= names

    def settings(**changed):
        values = {k: base for k, (base, _) in PERTURBED.items()}
        values.update(changed)
        values["path"] = str(tmp_path / values["path"])
        values["cache_dir"] = str(tmp_path / values["cache_dir"])
        return resolve_config(DataConfig(source="imagefolder", **values))

    def key(cfg):
        return cache.token_key(cfg, open_source(cfg), 32, comps.vqvae)

    base = settings()
    base_contents = cache_contents(base, folder, comps)
    for name, (_, value) in PERTURBED.items():
        changed = settings(**{name: value})
        contents = cache_contents(changed, folder, comps)
        same = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(contents, base_contents))
        if not same:
            assert key(changed) != key(base), f"data.{name} changes what the cache holds but not its key"
        if name not in cache.NOT_IN_TOKEN_KEY:
            assert key(changed) != key(base), f"data.{name} is meant to be in the key"
    assert key(settings(random_crops=3, center_crop=True)) == key(settings(center_crop=True))  # no effect: same key
    assert key(settings(colour_variants=0, colours={"red": (1, 2, 3), "blue": (4, 5, 6)})) == key(
        settings(colour_variants=0))  # no recoloured copies: the vocabulary is not in the key


def test_an_unreadable_shard_is_encoded_again_and_orphaned_temp_files_removed(tmp_path):
    folder = make_images(tmp_path / "data", n=3)
    first, _, _ = cached(tmp_path, folder)
    (tokens_dir,) = (tmp_path / "cache").glob("tokens-*")
    shard = tokens_dir / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a crash left it truncated
    orphan = tokens_dir / ".shard-00000.safetensors.tmp99999"
    orphan.write_bytes(b"half a shard")
    again, _, _ = cached(tmp_path, folder)
    assert torch.equal(again.tokens, first.tokens) and again.prompts == first.prompts
    assert not orphan.exists() and cache.readable(shard)


def test_encoding_streams_one_encode_batch_at_a_time(tmp_path, monkeypatch):
    """The shard's pixels are never all held: each encode batch is encoded before the next images are read."""
    folder = make_images(tmp_path / "data", n=4)
    from amused_tune.data import checks

    events, real_load, real_encode = [], checks.load_sample, cache.encode_images
    monkeypatch.setattr(cache, "cache_batches", lambda resolution: (2, 1))
    monkeypatch.setattr(checks, "load_sample", lambda *a: (events.append("load"), real_load(*a))[1])
    monkeypatch.setattr(cache, "encode_images", lambda vq, px: (events.append(len(px)), real_encode(vq, px))[1])
    dataset, _, _ = cached(tmp_path, folder, random_flip=True)  # 2 variants per image: one batch per image
    assert events == ["load", 2, "load", 2, "load", 2, "load", 2]
    assert dataset.tokens.shape == (4, 2, 8, 8)


RUNNER = r"""
import sys, time
from amused_tune.data import cache
from amused_tune.recipe import *
from amused_tune.train.loop import train
real = cache.encode_shard
def slow(*args):
    with open(sys.argv[3], "a") as log:
        log.write("encode\n")
    time.sleep(3)  # long enough for the other run to reach the lock
    return real(*args)
cache.encode_shard = slow
train(Recipe(model=ModelConfig(base="tiny"),
             data=DataConfig(source="imagefolder", path=sys.argv[1], cache_dir=sys.argv[2], random_flip=True),
             adapter=AdapterConfig(rank=4, alpha=4),
             train=TrainConfig(max_steps=2, batch_size=2, precision="fp32", checkpoint_every=100),
             output=OutputConfig(dir=sys.argv[4], loss_plot=False)))
"""


@pytest.mark.slow
def test_two_runs_at_once_on_one_cache_encode_once_and_train_like_a_sequential_run(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    folder = make_images(tmp_path / "data", n=4)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}

    def start(cache_dir: str, name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(folder), str(tmp_path / cache_dir),
                                 str(tmp_path / f"{cache_dir}.log"), str(tmp_path / name)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    both = [start("shared", "a"), start("shared", "b")]
    outs = [p.communicate(timeout=300)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    assert (tmp_path / "shared.log").read_text().split() == ["encode"]  # one shard, encoded once
    assert sum("waiting for it" in out for out in outs) <= 1
    alone = start("alone", "sequential")
    assert alone.wait(timeout=300) == 0
    weights = [load_file(tmp_path / n / "adapter" / "pytorch_lora_weights.safetensors")
               for n in ("a", "b", "sequential")]
    for name, w in weights[2].items():
        assert torch.equal(weights[0][name], w) and torch.equal(weights[1][name], w), name
