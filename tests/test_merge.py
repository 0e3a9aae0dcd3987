"""`amused-tune merge`: the LoRA fused into the base, saved as a pipeline folder diffusers' AmusedPipeline loads.

Tolerance: the merged weight W + s·BA against the unmerged W x + s·B(A x), both fp32: atol = rtol = 1e-5
(observed differences are ~1e-6, the adapter itself moves the logits by > 1e-2).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_images, reset_accelerate

from amused_tune.model import adapters
from amused_tune.cli import main as cli_main
from amused_tune.model.bases import encode_prompts, load_components
from conftest import tiny_uvit_logits as logits

TOL = dict(atol=1e-5, rtol=1e-5)


def train_run(out, data, kind="lora", text_encoder=False):
    from amused_tune.recipe import (AdapterConfig, DataConfig, ModelConfig, OptimConfig, OutputConfig, Recipe,
                                    TrainConfig)
    from amused_tune.train.loop import train

    recipe = Recipe(
        model=ModelConfig(base="tiny"),
        data=DataConfig(source="imagefolder", path=str(data), cache=False),
        adapter=AdapterConfig(kind=kind, rank=4, alpha=8, text_encoder=text_encoder),
        optim=OptimConfig(lr=2e-2 if kind == "lora" else 1e-3),
        train=TrainConfig(max_steps=3, precision="fp32", checkpoint_every=3, cond_dropout=0.0),
        output=OutputConfig(dir=str(out), loss_plot=False),
    )
    train(recipe)
    reset_accelerate()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("merge") / "data", n=2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data):
    """A tiny run with a LoRA on the U-ViT and on the text encoder."""
    return train_run(tmp_path_factory.mktemp("merge") / "lora-run", data, text_encoder=True)


def test_merged_pipeline_logits_equal_base_plus_adapter(lora_run, tmp_path):
    from diffusers import AmusedPipeline

    out = tmp_path / "merged"
    assert cli_main(["merge", str(lora_run), "--out", str(out)]) == 0
    pipe = AmusedPipeline.from_pretrained(out)  # what a diffusers user does

    reference = load_components("tiny")  # model.base of the run, with the adapter unmerged
    adapters.load_lora(reference.transformer, lora_run)
    adapters.load_lora(reference.text_encoder, lora_run, part="text_encoder")
    expected = logits(reference.transformer)
    assert (expected - logits(load_components("tiny").transformer)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(pipe.transformer), expected, **TOL)

    prompts = ["a picture number 0", "a cat"]
    merged_text = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)
    expected_text = encode_prompts(reference.text_encoder, reference.tokenizer, prompts)
    for got, want in zip(merged_text, expected_text):
        torch.testing.assert_close(got, want, **TOL)
    assert not [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]  # a plain U-ViT


def test_merged_weights_are_base_plus_scale_times_alpha_over_rank_times_BA(lora_run, tmp_path):
    """Checked against the adapter file itself, not the kit's loader: W' = W + scale * alpha / rank * B @ A, with
    rank 4 and alpha 8 (a lost alpha, or the scale applied twice or not at all, is off by 2x or more)."""
    from safetensors.torch import load_file

    out = tmp_path / "half"
    assert cli_main(["merge", str(lora_run / "adapter"), "--out", str(out), "--base", "tiny", "--scale", "0.5"]) == 0
    lora = load_file(lora_run / "adapter" / "pytorch_lora_weights.safetensors")
    base = load_components("tiny").transformer.state_dict()
    merged = load_components(str(out)).transformer.state_dict()
    pairs = [k[len("transformer."):-len(".lora_A.weight")] for k in lora if k.startswith("transformer.")
             and k.endswith(".lora_A.weight")]
    assert len(pairs) == 24  # to_q, to_k, to_v of the tiny U-ViT's attentions
    for name in pairs:
        delta = lora[f"transformer.{name}.lora_B.weight"] @ lora[f"transformer.{name}.lora_A.weight"]
        assert delta.abs().max() > 1e-3, name  # the trained adapter is not zero
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + 0.5 * 8 / 4 * delta, **TOL)
    untouched = [k for k in base if not any(k == f"{n}.weight" for n in pairs)]
    assert all(torch.equal(merged[k], base[k]) for k in untouched)


def test_merge_dtype_writes_that_precision(lora_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    assert cli_main(["merge", str(lora_run), "--out", str(out), "--dtype", "bf16"]) == 0
    assert {v.dtype for v in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors").values()} == {
        torch.bfloat16}


def test_merge_full_run_swaps_in_its_transformer(data, tmp_path):
    from diffusers import AmusedPipeline

    run = train_run(tmp_path / "full-run", data, kind="full")
    out = tmp_path / "merged"
    assert cli_main(["merge", str(run), "--out", str(out)]) == 0
    pipe = AmusedPipeline.from_pretrained(out)
    tuned = load_components("tiny")
    from diffusers import UVit2DModel

    tuned.transformer = UVit2DModel.from_pretrained(run / "transformer")
    torch.testing.assert_close(logits(pipe.transformer), logits(tuned.transformer), atol=0, rtol=0)


def test_merge_refuses_pickled_weights(data, tmp_path, capsys):
    run = train_run(tmp_path / "full-run", data, kind="full")
    from diffusers import UVit2DModel

    tuned = UVit2DModel.from_pretrained(run / "transformer")
    for f in (run / "transformer").glob("*.safetensors"):
        f.unlink()
    tuned.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").rename(run / "transformer" / "diffusion_pytorch_model.bin")
    capsys.readouterr()  # (the training run's progress bar)
    assert cli_main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no .safetensors weights" in err[0] and not (tmp_path / "merged").exists()


def test_merge_errors_are_one_line(lora_run, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    cases = [
        (["merge", str(lora_run), "--out", str(full)], "exists and is not empty"),
        (["merge", str(lora_run), "--out", str(lora_run), "--overwrite"], "would overwrite the run"),
        (["merge", str(lora_run), "--out", str(lora_run.parent), "--overwrite"], "would overwrite the run"),
        (["merge", str(lora_run), "--out", str(tmp_path / "b"), "--base", "./no/such/folder"], "does not exist"),
        (["merge", str(tmp_path / "missing"), "--out", str(tmp_path / "c")], "does not exist"),
        (["merge", str(lora_run)], "--out"),
    ]
    for argv, expected in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert (full / "something").read_text() == "x"
    assert (lora_run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
