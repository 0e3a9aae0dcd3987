"""The shipped recipes: they reproduce the aMUSEd report's tables, `amused-tune recipes` lists and copies them,
every one trains on the tiny model, and the quantized-base lever (model.quantize) works and fails clearly."""

from __future__ import annotations

import io
import json
import math
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from amused_tune.cli import recipes as recipes_cli
from amused_tune.cli.args import parse_recipe

PAPER = yaml.safe_load((Path(__file__).parent / "data" / "paper-tables.yaml").read_text())
TABLES = {"finetune_256": ("amused/amused-256", 256, "nouns"), "finetune_512": ("amused/amused-512", 512, "minecraft")}
JSON_KEYS = {"name", "base", "resolution", "adapter_kind", "lora_rank", "lora_alpha", "batch_size", "grad_accum", "lr",
             "adam_8bit", "paper_memory_gb"}


def steps_range(text: str) -> tuple[int, int]:
    """'750-1000' -> (750, 1000); '~750' -> (750, 750)."""
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    return min(numbers), max(numbers)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = recipes_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def listed() -> list[dict]:
    code, out, err = run_cli(["--json"])
    assert code == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------------------------- the paper's values


def test_json_lists_the_20_paper_recipes_with_the_reports_values(listed):
    paper = [r for r in listed if r["paper_memory_gb"] is not None]
    assert len(paper) == 20, [r["name"] for r in paper]
    assert all(JSON_KEYS <= set(r) for r in listed)
    matched = set()
    for table, (base, resolution, card) in TABLES.items():
        for row in PAPER[table]:
            kind = "lora" if row["lora"] else "full"
            hits = [r for r in paper if r["base"] == base and r["data_card"] == card and r["adapter_kind"] == kind
                    and r["adam_8bit"] == row["adam_8bit"] and r["batch_size"] == row["batch_size"]
                    and r["grad_accum"] == row["grad_accum"]]
            assert len(hits) == 1, (table, row, [h["name"] for h in hits])
            r = hits[0]
            matched.add(r["name"])
            assert r["lr"] == pytest.approx(row["lr"], rel=1e-9), r["name"]
            assert r["paper_memory_gb"] == pytest.approx(row["memory_gb"]), r["name"]
            assert r["max_steps"] == steps_range(row["steps"])[1], r["name"]  # the upper end of the report's range
            assert r["resolution"] == resolution and r["precision"] == "bf16"
            if row["lora"]:
                assert (r["lora_rank"], r["lora_alpha"], r["model_dtype"]) == (16, 32, "bf16"), r["name"]
            else:
                assert (r["lora_rank"], r["lora_alpha"], r["model_dtype"]) == (None, None, "fp32"), r["name"]
            mode = "lora" if row["lora"] else ("full8bit" if row["adam_8bit"] else "full")
            assert r["name"] == f"{card}_{resolution}_{mode}_bs{row['batch_size']}x{row['grad_accum']}"
    assert len(matched) == 18
    for model, row in PAPER["styledrop"].items():
        resolution = int(model.split("-")[1])
        r = next(r for r in paper if r["name"] == f"styledrop_{resolution}")
        assert (r["base"], r["resolution"], r["adapter_kind"]) == (f"amused/{model}", resolution, "lora")
        assert (r["lora_rank"], r["lora_alpha"]) == (row["lora_rank"], row["lora_alpha"])
        assert (r["batch_size"], r["adam_8bit"]) == (row["batch_size"], False)
        assert r["lr"] == pytest.approx(row["lr"]) and r["paper_memory_gb"] == pytest.approx(row["memory_gb"])
        low, high = steps_range(row["steps"])
        assert low <= r["max_steps"] <= high


def test_each_paper_recipe_header_says_what_it_trains_its_memory_card_and_command():
    for path in recipes_cli.recipe_files():
        head = recipes_cli.header(path)
        text = "\n".join(head)
        if path.stem in ("quickstart", "my_folder") or path.stem.startswith("toy_") or "# paper: no paper row" in text:
            continue  # not paper rows: demos on the toy base, your own data
        assert head[0].startswith(f"# {path.stem}: "), path.name
        assert re.search(r"^# paper: [0-9.]+ GB", text, re.MULTILINE), path.name
        assert re.search(r"^# measured: ", text, re.MULTILINE), path.name
        assert re.search(r"^# data card: \w+", text, re.MULTILINE), path.name
        assert f"# command: amused-tune recipes/{path.stem}.yaml" in text, path.name


def test_recipes_use_existing_dataset_cards():
    from amused_tune.data.cards import load_card

    for path in recipes_cli.recipe_files():
        recipe, _, _ = parse_recipe([str(path)])
        if recipe.data.card is None:
            continue
        card = load_card(recipe.data.card)
        assert path.stem in card.get("recipes", [path.stem]), f"{recipe.data.card} card does not list {path.stem}"


def test_memory_header_parsing():
    parse = recipes_cli.memory_from_header
    note = "not measured yet (bench/train.py on a GPU writes it)"
    assert parse(["# paper: 6.5 GB (Table 2)", f"# measured: {note}"]) == {
        "paper_memory_gb": 6.5, "measured_memory_gb": None, "measured_note": note}
    got = parse(["# paper: 16.99 GB", "# measured: 4.12 GB (NVIDIA H100 80GB HBM3; 4.30 GB reserved)"])
    assert got["paper_memory_gb"] == 16.99 and got["measured_memory_gb"] == 4.12


# --------------------------------------------------------------------------------------------- the CLI


def test_recipes_table_lists_every_recipe(listed):
    code, out, _ = run_cli([])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["name", "base", "mode", "batch", "x", "accum", "lr", "paper", "GB", "measured", "GB"]
    for r in listed:
        assert any(line.startswith(r["name"] + " ") for line in lines), r["name"]
    row = next(line for line in lines if line.startswith("nouns_256_lora_bs1x16 "))
    assert "LoRA r16/a32" in row and "1 x 16" in row and "8.0e-04" in row and " 6.5 " in row
    assert "full 8-bit Adam" in next(line for line in lines if line.startswith("minecraft_512_full8bit_bs1x8 "))


def test_recipes_cli_is_wired_into_amused_tune(tmp_path):
    from amused_tune import cli

    with redirect_stdout(io.StringIO()):
        assert cli.main(["recipes", "cp", "quickstart", str(tmp_path)]) == 0
    assert (tmp_path / "quickstart.yaml").read_text().startswith("# Quickstart")


def test_a_copy_gets_its_own_output_dir_so_its_first_run_trains(tmp_path, monkeypatch):
    """`recipes cp quickstart my_style.yaml`: runs/my_style-lora, not the quickstart's folder (whose run would stop
    the copy with "holds a run of a different recipe"); a name with a space is quoted and still parses."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["cp", "quickstart", "my_style.yaml"])
    assert code == 0 and "output.dir: runs/my_style-{adapter.kind}" in out
    copy, _, _ = parse_recipe(["my_style.yaml"])
    assert copy.output.dir == "runs/my_style-lora"
    text = (tmp_path / "my_style.yaml").read_text()
    assert "runs/quickstart" not in text and "--adapter runs/my_style-lora" in text
    full, _, _ = parse_recipe(["my_style.yaml", "--adapter.kind=full", "--styledrop.rounds=1"])
    assert full.output.dir == "runs/my_style-full"
    assert run_cli(["cp", "styledrop_256", "my style.yaml"])[0] == 0
    assert parse_recipe(["my style.yaml"])[0].output.dir == "runs/my style"
    # the quickstart ran here, then the copy is edited and run: its folder is its own, so nothing refuses it
    from amused_tune.train.outputs import prepare_output_dir

    original, _, _ = parse_recipe([str(recipes_cli.RECIPES_DIR / "quickstart.yaml")])
    prepare_output_dir(Path(original.output.dir), original, True)
    (Path(original.output.dir) / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # it trained a step
    edited, _, _ = parse_recipe(["my_style.yaml", "--data.prompt=a red circle on a white background in [v] style"])
    prepare_output_dir(Path(edited.output.dir), edited, True)
    assert (tmp_path / "runs" / "quickstart-lora" / "recipe.yaml").is_file()
    assert (tmp_path / "runs" / "my_style-lora" / "recipe.yaml").is_file()
    with pytest.raises(Exception, match="different recipe"):  # what the copy met before it had its own folder
        edited.output.dir = original.output.dir
        prepare_output_dir(Path(original.output.dir), edited, True)


def test_cp_copies_a_recipe_to_edit(tmp_path):
    dest = tmp_path / "mine.yaml"
    code, out, _ = run_cli(["cp", "nouns_256_lora_bs1x16", str(dest)])
    assert code == 0 and str(dest) in out
    text = dest.read_text()
    assert f"# command: amused-tune {dest}" in text
    original, _, _ = parse_recipe([str(recipes_cli.RECIPES_DIR / "nouns_256_lora_bs1x16.yaml")])
    copy, _, _ = parse_recipe([str(dest)])
    assert copy.output.dir == "runs/mine" and original.output.dir == "runs/nouns_256_lora_bs1x16"
    copy.output.dir = original.output.dir
    assert copy.to_dict() == original.to_dict()  # the same recipe, in a folder of its own

    code, _, err = run_cli(["cp", "nouns_256_lora_bs1x16", str(dest)])
    assert code == 2 and "--force" in err
    assert run_cli(["cp", "minecraft_512_lora_bs1x8.yaml", str(dest), "--force"])[0] == 0
    assert "minecraft_512_lora_bs1x8" in dest.read_text()
    assert run_cli(["cp", "styledrop_256", str(tmp_path)])[0] == 0  # a folder: keeps the name
    assert (tmp_path / "styledrop_256.yaml").is_file()

    code, _, err = run_cli(["cp", "no_such_recipe", str(tmp_path / "x.yaml")])
    assert code == 2 and "no_such_recipe" in err and "nouns_256_lora_bs1x16" in err


# --------------------------------------------------------------------------------------------- every recipe trains


@pytest.mark.parametrize("path", recipes_cli.recipe_files(), ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_the_tiny_model(path, image_folder, tmp_path, monkeypatch):
    from amused_tune.train.loop import train

    monkeypatch.setenv("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    recipe, _, _ = parse_recipe([
        str(path), "--model.base=tiny", "--model.resolution=null", "--train.max_steps=2",
        "--model.dtype=fp32", "--train.precision=fp32", "--train.device=cpu",  # bf16 autocast is slow on a CPU
        "--data.card=null", "--data.source=imagefolder", f"--data.path={image_folder}", "--data.prompt=null",
        "--validation.prompts=[]", "--output.loss_plot=false", f"--output.dir={out}", "--train.log_every=1",
    ])
    shipped, _, _ = parse_recipe([str(path)])
    assert (recipe.train.batch_size, recipe.train.grad_accum) == (shipped.train.batch_size, shipped.train.grad_accum)
    summary = train(recipe)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "step_s" in m] == [1, 2]
    if recipe.adapter.kind == "lora":
        assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (out / "transformer").is_dir()


# --------------------------------------------------------------------------------------------- model.quantize


def _quantize_recipe(bits: str):
    return parse_recipe([str(recipes_cli.RECIPES_DIR / "nouns_256_lora_bs1x16.yaml"), "--model.base=tiny",
                         "--model.resolution=null", f"--model.quantize={bits}"])[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantize_on_a_cpu_is_a_clear_recipe_error(bits):
    from amused_tune.model.bases import build_tiny
    from amused_tune.recipe import RecipeError
    from amused_tune.train.setup import setup_models

    with pytest.raises(RecipeError, match="model.quantize needs a CUDA GPU"):
        setup_models(_quantize_recipe(bits), build_tiny(), torch.device("cpu"))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_is_wrapped_by_lora_and_trains(bits):
    """The layer swap itself, with bitsandbytes' CPU kernels (allow_cpu: what the GPU path does, minus the GPU)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb

    from amused_tune.model import adapters
    from amused_tune.model.bases import build_tiny
    from amused_tune.model.quantize import quantize_linear_layers
    from amused_tune.common import place

    transformer = build_tiny().transformer
    linears = sum(type(m) is torch.nn.Linear for m in transformer.modules())
    full_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    assert quantize_linear_layers(transformer, f"{bits}bit", torch.float32, allow_cpu=True) == linears
    quantized = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert not any(type(m) is torch.nn.Linear for m in transformer.modules())
    assert sum(isinstance(m, quantized) for m in transformer.modules()) == linears
    assert sum(p.numel() * p.element_size() for p in transformer.parameters()) < full_bytes / 2

    place(transformer, torch.device("cpu"), torch.float32)
    adapters.attach_lora(transformer, 4, 8)
    to_q = transformer.transformer_layers[0].attn1.to_q
    assert isinstance(to_q, peft_bnb.Linear8bitLt if bits == 8 else peft_bnb.Linear4bit)
    assert isinstance(to_q.base_layer, quantized)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    ids = torch.randint(0, 64, (2, 8, 8))
    logits = transformer(ids, encoder_hidden_states=torch.randn(2, 77, 32), pooled_text_emb=torch.randn(2, 32),
                         micro_conds=torch.tensor([[32.0, 32, 0, 0, 6]] * 2))
    logits.float().square().mean().backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)


def test_quantize_refuses_a_module_with_lora_and_bad_bits():
    from amused_tune.model import adapters
    from amused_tune.model.bases import build_tiny
    from amused_tune.model.quantize import quantize_linear_layers
    from amused_tune.recipe import RecipeError

    transformer = build_tiny().transformer
    with pytest.raises(RecipeError, match="8bit or 4bit"):
        quantize_linear_layers(transformer, 3, allow_cpu=True)
    adapters.attach_lora(transformer, 4, 8)
    with pytest.raises(ValueError, match="before attaching LoRA"):
        quantize_linear_layers(transformer, 8, allow_cpu=True)
    # inference with unmerged adapters (the sampler): the LoRA layers stay, their base layers are quantized
    plain = sum(type(m) is torch.nn.Linear and ".lora_" not in f".{n}" for n, m in transformer.named_modules())
    assert quantize_linear_layers(transformer, 8, torch.float32, under_lora=True, allow_cpu=True) == plain
    assert type(transformer.transformer_layers[0].attn1.to_q.lora_A["default"]) is torch.nn.Linear


def test_quantize_needs_lora():
    from amused_tune.recipe import RecipeError

    with pytest.raises(RecipeError, match="adapter.kind=lora"):
        parse_recipe([str(recipes_cli.RECIPES_DIR / "nouns_256_full_bs8x1.yaml"), "--model.quantize=8bit"])


def test_resolve_fills_what_the_recipe_leaves_and_validate_only_refuses():
    import copy

    from amused_tune.recipe import DataConfig, OptimConfig, OutputConfig, Recipe, RecipeError, ValidationConfig

    recipe = Recipe(optim=OptimConfig(name="lion8bit"), data=DataConfig(caption_dropout=0.3),
                    output=OutputConfig(dir="runs/x-{adapter.rank}"), validation=ValidationConfig(prompts="a cat"))
    before = copy.deepcopy(recipe)
    with pytest.raises(RecipeError, match=r"call Recipe.resolve\(\) before validate"):
        recipe.validate()
    assert recipe == before  # refusing changed nothing
    assert recipe.resolve() is recipe
    assert (recipe.optim.lr, recipe.optim.betas, recipe.train.cond_dropout, recipe.output.dir,
            recipe.validation.prompts) == (1e-4, (0.9, 0.99), 0.3, "runs/x-16", ["a cat"])
    resolved = copy.deepcopy(recipe)
    assert recipe.validate() == resolved and recipe.resolve() == resolved  # validate keeps it, resolve is idempotent
