"""bench/train.py: the CPU smoke run (--tiny) trains through the kit's trainer and writes its table, JSON and PNG."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from amused_tune.cli import recipes as recipes_cli
from amused_tune.train import checkpoints, outputs

ROOT = Path(__file__).resolve().parents[1]
# one LoRA bs 1 recipe with two of its levers (one needs CUDA: reported as skipped), one full 8-bit Adam recipe
ONLY = r"^nouns_256_lora_bs1x16(\+(grad-ckpt|4bit-base))?$|^minecraft_512_full8bit_bs4x2$"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_train", None)


def test_tiny_bench_runs_the_kits_trainer_and_writes_json_and_png(bench, tmp_path, capsys):
    save, write_final = checkpoints.save, outputs.write_final
    code = bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--images", "4", "--out", str(tmp_path),
                       "--only", ONLY])
    assert code == 0
    assert (checkpoints.save, outputs.write_final) == (save, write_final)  # the no-saving patch is undone
    data = json.loads((tmp_path / "train-tiny-cpu.json").read_text())
    assert data["device_type"] == "cpu" and data["steps"] == 1
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"nouns_256_lora_bs1x16", "nouns_256_lora_bs1x16+grad-ckpt",
                         "nouns_256_lora_bs1x16+4bit-base", "minecraft_512_full8bit_bs4x2"}
    lora, full = rows["nouns_256_lora_bs1x16"], rows["minecraft_512_full8bit_bs4x2"]
    for row in (lora, full):  # each figure derived from what was run and from the recipe file, not restated
        recipe_file = recipes_cli.RECIPES_DIR / f"{row['recipe']}.yaml"
        assert row["paper_gb"] == recipes_cli.memory_from_header(recipes_cli.header(recipe_file))["paper_memory_gb"]
        assert row["images_per_s"] == pytest.approx(row["batch_size"] * row["grad_accum"] / row["step_s"])
        assert row["step_s"] > 0 and row["peak_gb"] > 0
    assert lora["loss"] == pytest.approx(trained_loss("nouns_256_lora_bs1x16", tmp_path), rel=1e-6)
    reference = bench.reference()
    assert (lora["ref_gb"], lora["ref_step_s"]) == (reference["nouns_256_lora_bs1x16"]["peak_gb"],
                                                    reference["nouns_256_lora_bs1x16"]["step_s"])
    assert full["ref_gb"] is None and "minecraft_512_full8bit_bs4x2" not in reference
    assert (full["batch_size"], full["grad_accum"]) == (4, 2)
    assert rows["nouns_256_lora_bs1x16+grad-ckpt"]["lever"] == "grad-ckpt"
    assert "CUDA" in rows["nouns_256_lora_bs1x16+4bit-base"]["skipped"]
    assert (tmp_path / "train-tiny-cpu.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "config" in out and "paper GB" in out and "s/step" in out and "nouns_256_lora_bs1x16+grad-ckpt" in out
    assert "| `nouns_256_lora_bs1x16` | amused/amused-256 | LoRA r16/a32 | 1 x 16 | 8.0e-04 | 6.5 | — |" in out


def trained_loss(name: str, tmp_path: Path) -> float:
    """The first step's loss of recipe `name` trained by the kit itself on the bench's tiny setup (4 synthetic
    40 px images, the tiny model, fp32), for comparison with the bench's row."""
    from conftest import reset_accelerate

    from amused_tune.cli.args import parse_recipe
    from amused_tune.model.bases import build_tiny
    from amused_tune.train.loop import train

    bench_module = sys.modules["bench_train"]
    images = bench_module.synthetic_images(tmp_path / "own-images", 4, 40)
    out = tmp_path / "own-run"
    recipe, _, _ = parse_recipe([
        str(recipes_cli.RECIPES_DIR / f"{name}.yaml"), f"--output.dir={out}", "--train.max_steps=1",
        "--validation.prompts=[]", "--output.loss_plot=false", "--data.card=null", "--data.source=imagefolder",
        f"--data.path={images}", "--data.prompt=null", "--model.base=tiny", "--model.resolution=null",
        "--model.dtype=fp32", "--train.precision=fp32", "--train.device=cpu", f"--data.cache_dir={tmp_path / 'c'}"])
    reset_accelerate()
    return train(recipe, components=build_tiny())["loss"]


def test_compare_derives_the_targets_from_the_measured_row(bench):
    ref = {"r": {"peak_gb": 4.0, "step_s": 3.0}}
    row = bench.compare({"recipe": "r", "lever": None, "device": "cuda", "peak_gb": 3.5, "paper_gb": 3.0,
                         "step_s": 1.5}, ref)
    assert (row["ref_gb"], row["ref_step_s"]) == (4.0, 3.0)
    assert row["below_paper"] is False and row["below_ref"] is True and row["speedup_vs_ref"] == 2.0
    lever = bench.compare({"recipe": "r", "lever": "grad-ckpt", "device": "cuda", "peak_gb": 3.5, "paper_gb": None,
                           "step_s": 1.0}, ref)
    assert lever["ref_gb"] is None and lever["below_paper"] is False and lever["speedup_vs_ref"] is None


def test_bench_covers_every_paper_recipe_and_the_levers(bench):
    rows, errors = recipes_cli.list_recipes()
    assert not errors
    configs = bench.configs(rows, levers=True)
    paper = {r["name"] for r in rows if r["paper_memory_gb"] is not None}
    assert {c.name for c in configs if c.lever is None} == paper and len(paper) == 20
    for name in ("nouns_256_lora_bs1x16", "minecraft_512_lora_bs1x8"):  # the report's bs 1 LoRA rows
        assert {c.lever for c in configs if c.recipe["name"] == name} - {None} == {s for s, _, _ in bench.LEVERS}
    assert len(configs) == 20 + 2 * len(bench.LEVERS)
    with_styledrop = bench.configs(rows, levers=True, lever_recipes="^styledrop_256$")
    assert {c.name for c in with_styledrop if c.lever} == {f"styledrop_256+{s}" for s, _, _ in bench.LEVERS}
    assert set(bench.reference()) <= paper  # every reference row names a shipped recipe


def test_update_recipes_writes_the_measured_header(bench, tmp_path):
    recipe = tmp_path / "nouns_256_lora_bs1x16.yaml"
    shutil.copy(recipes_cli.RECIPES_DIR / recipe.name, recipe)
    results = tmp_path / "results.json"
    row = {"config": recipe.stem, "recipe": recipe.stem, "lever": None, "peak_gb": 2.345, "reserved_gb": 2.5,
           "step_s": 0.5, "recipe_row": {"file": str(recipe)}}
    results.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda",
                                   "date": "2026-11-26T10:00:00", "rows": [row]}))
    assert bench.main(["--update-recipes", str(results)]) == 0
    got = recipes_cli.memory_from_header(recipes_cli.header(recipe))
    assert got["measured_memory_gb"] == 2.35 and "NVIDIA H100 80GB HBM3" in got["measured_note"]
    assert got["paper_memory_gb"] == 6.5


def test_shared_copy_shares_weights_but_not_parameters(bench):
    import torch

    from amused_tune.model.bases import build_tiny

    base = build_tiny()
    copy = bench.shared_copy(base)
    for a, b in zip(base.transformer.parameters(), copy.transformer.parameters()):
        assert a is not b and a.data_ptr() == b.data_ptr()
    copy.transformer.requires_grad_(False)
    copy.vqvae.to(torch.bfloat16)  # a move makes new tensors: the original keeps its weights and flags
    assert all(p.requires_grad for p in base.transformer.parameters())
    assert all(p.dtype == torch.float32 for p in base.vqvae.parameters())
