"""What a GPU run relies on, checked on the CPU: the warmup, the trackers (TensorBoard, Weights & Biases), the cache
training like the uncached path in bf16, fp16 loss scaling with skipped steps, the weight-decay groups, the
empty-prompt embedding of a text-encoder LoRA's validation, and the mixed-half-precision refusal."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from amused_tune.cli import main as cli_main
from amused_tune.model.bases import build_tiny, encode_prompts
from amused_tune.recipe import (AdapterConfig, DataConfig, ModelConfig, OptimConfig, OutputConfig, Recipe,
                                TrainConfig, ValidationConfig)
from amused_tune.train import loop, outputs, step as train_step, validation
from amused_tune.train.loop import train
from helpers import tiny

REPO = Path(__file__).resolve().parent.parent


def rows(run: Path) -> list[dict]:
    return outputs.read_metrics(run / "metrics.jsonl")


# --------------------------------------------------------------------------------------------- schedule


def test_warmup_ramps_the_lr_with_the_constant_schedule(tmp_path, image_folder):
    """optim.warmup_steps with the default constant schedule: the lr rises linearly over the warmup."""
    train(tiny(tmp_path, image_folder, optim={"scheduler": "constant", "warmup_steps": 10}))
    assert [r["lr"] for r in rows(tmp_path / "run")] == pytest.approx([1e-4, 2e-4, 3e-4])


# --------------------------------------------------------------------------------------------- trackers


def test_tensorboard_writes_loss_lr_and_the_sample_grids(tmp_path, image_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(tmp_path, image_folder, output={"tensorboard": True},
               validation={"prompts": ["a red square"], "every": 2, "steps": 2}))
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = {"scalars": set(), "images": set()}
    steps = {}
    for event in events:
        acc = EventAccumulator(str(event.parent), size_guidance={"images": 0, "scalars": 0}).Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
        for tag in acc.Tags()["images"]:
            steps[tag] = sorted({e.step for e in acc.Images(tag)})
        if "loss" in acc.Tags()["scalars"]:
            assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm"} <= tags["scalars"]
    assert any(t.startswith("samples") for t in tags["images"])
    assert {s for tag, found in steps.items() for s in found} == {0, 2, 3}  # before step 1, every 2, the last
    from PIL import Image

    assert Image.open(tmp_path / "run" / "samples" / "step-2.png").text["draws"] == "fast"  # grids draw fast


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, image_folder, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("tensorboard", "tensorboardX") else real(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{base: tiny}}\ndata: {{source: imagefolder, path: {image_folder}, cache: false}}\n"
                      f"train: {{max_steps: 1, precision: fp32}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    assert cli_main([str(recipe), "--output.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "amused-tune[tensorboard]"' in err[0], err


def fake_wandb(calls: list) -> types.ModuleType:
    """Enough of the wandb module for accelerate's tracker, recording what it is given."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class FakeRun:
        def log(self, values, step=None, **kwargs):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    module.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    module.config = types.SimpleNamespace(update=lambda values, **kw: calls.append(("config", values)))
    module.Image = lambda image, **kw: ("image", image.size)
    module.finish = lambda: None
    return module


def test_wandb_gets_the_config_metrics_and_grids(tmp_path, image_folder, monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    from amused_tune.train import setup

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    monkeypatch.setitem(setup.TRACKER_INSTALLED, "wandb", lambda: True)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers",
                        accelerate.tracking._available_trackers + [LoggerType.WANDB])
    train(tiny(tmp_path, image_folder, output={"log_with": ["wandb"]},
               validation={"prompts": ["a red square"], "every": 3, "steps": 2}, train={"max_steps": 2}))
    config = next(c[1] for c in calls if c[0] == "config")
    assert config["optim.lr"] == 1e-3 and config["model.base"] == "tiny"
    logged = [(c[2], sorted(c[1])) for c in calls if c[0] == "log"]
    assert (1, sorted(["loss", "lr", "grad_norm", "images_per_s", "step_s", "peak_mem_gb",
                       "skipped_nonfinite"])) in logged
    assert [step for step, keys in logged if keys == ["samples"]] == [0, 2]


# --------------------------------------------------------------------------------------------- cache and bf16


def test_bf16_run_from_the_cache_trains_like_one_without_it(tmp_path):
    from conftest import make_images

    folder = make_images(tmp_path / "data", n=4, size=48)
    common = {"model": {"dtype": "bf16"}, "train": {"precision": "bf16", "max_steps": 3, "cond_dropout": 0.0},
              "data": {"center_crop": True, "random_flip": False}}
    losses = {}
    for cache in (False, True):
        recipe = tiny(tmp_path, folder, f"cache-{cache}", **common)
        recipe.data.cache = cache
        train(recipe, components=build_tiny())
        losses[cache] = [r["loss"] for r in rows(tmp_path / f"cache-{cache}")]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False])]
    print("relative loss difference, cached vs uncached (bf16):", rel)
    assert max(rel) <= 2e-3, (losses, rel)


# --------------------------------------------------------------------------------------------- fp16 loss scaling


def test_fp16_skipped_nonfinite_step_leaves_the_scaler_working(tmp_path, image_folder, monkeypatch):
    """fp16 with train.skip_nonfinite: a NaN loss at step 2 is skipped by the loss scaler itself (its scale
    halves), step 3 trains, and the metrics show the scale and the skipped step. (CPU accelerate has no fp16 scaler:
    the test gives the fp16 accelerator torch's CPU GradScaler.)"""
    def fp16_accelerator(recipe):
        accelerator = Accelerator(mixed_precision="fp16", cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        accelerator.native_amp = True  # as on a GPU: clipping unscales the gradients first
        return accelerator

    monkeypatch.setattr(loop, "make_accelerator", fp16_accelerator)
    original, calls = train_step.compute_loss, {"n": 0}

    def nan_at_step_2(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_step, "compute_loss", nan_at_step_2)
    summary = train(tiny(tmp_path, image_folder, train={"skip_nonfinite": True}))
    assert summary["step"] == 3 and summary["skipped_nonfinite"] == 1
    r = rows(tmp_path / "run")
    assert [x["loss_scale"] for x in r] == [1024.0, 512.0, 512.0]
    assert [x["scaler_skipped"] for x in r] == [0, 1, 1] and r[1]["loss"] is None


# --------------------------------------------------------------------------------------------- optimizer groups


def test_full_finetuning_does_not_decay_norms_biases_or_embeddings(tmp_path, image_folder):
    run = loop.set_up(tiny(tmp_path, image_folder, adapter={"kind": "full"}, optim={"weight_decay": 0.05}), None)
    decay = {id(p): g["weight_decay"] for g in run.optimizer.param_groups for p in g["params"]}
    t = run.comps.transformer
    assert decay[id(t.embed.embeddings.weight)] == 0.0
    norms = [m for m in t.modules() if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None]
    assert norms and all(decay[id(m.weight)] == 0.0 for m in norms)
    biases = [p for n, p in t.named_parameters() if n.endswith("bias")]
    assert all(decay[id(p)] == 0.0 for p in biases)  # (aMUSEd's U-ViT has few biases: use_bias=False)
    linears = [m.weight for m in t.modules() if isinstance(m, torch.nn.Linear)]
    assert all(decay[id(w)] == 0.05 for w in linears)
    assert len(decay) == sum(p.numel() > 0 for p in t.parameters())  # every weight trains, each in one group


# --------------------------------------------------------------------------------------------- validation


def test_text_encoder_lora_validation_guides_with_the_current_empty_prompt(tmp_path, image_folder, monkeypatch):
    run = loop.set_up(tiny(tmp_path, image_folder, adapter={"text_encoder": True},
                           validation={"prompts": ["a red square"], "steps": 2}), build_tiny())
    with torch.no_grad():  # the LoRA has learned something since the run started
        for name, p in run.comps.text_encoder.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    seen = {}

    def spy(transformer, cond, empty, seeds, **kwargs):
        seen["empty"] = empty
        raise StopIteration

    monkeypatch.setattr(validation, "sample_tokens", spy)
    with pytest.raises(StopIteration):
        run.validate(1)
    with torch.no_grad():
        hidden, pooled = encode_prompts(run.comps.text_encoder, run.comps.tokenizer, [""])
    assert torch.allclose(seen["empty"][0], hidden) and torch.allclose(seen["empty"][1], pooled)


# --------------------------------------------------------------------------------------------- the run object


def test_the_run_keeps_raw_modules_apart_from_what_the_step_calls(tmp_path, image_folder):
    """train.compile: the step calls the compiled U-ViT; saving and validation use the raw one (LoRA attached)."""
    from diffusers import UVit2DModel

    run = loop.set_up(tiny(tmp_path, image_folder, train={"compile": True}, adapter={"text_encoder": True}), None)
    assert isinstance(run.transformer, torch._dynamo.eval_frame.OptimizedModule)
    assert type(run.comps.transformer) is UVit2DModel and run.transformer._orig_mod is run.comps.transformer
    assert run.text_encoder is run.comps.text_encoder  # one process: no DDP wrapper
    assert any("lora_A" in n for n, _ in run.comps.text_encoder.named_parameters())
    with pytest.raises(AttributeError):  # built once: a field cannot be re-bound
        run.transformer = run.comps.transformer


# --------------------------------------------------------------------------------------------- precision


def test_mixed_half_precisions_are_refused_in_one_line(tmp_path, image_folder, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{base: tiny, dtype: fp16}}\ndata: {{source: imagefolder, path: {image_folder}}}\n"
                      f"train: {{max_steps: 1, precision: bf16}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    assert cli_main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.dtype=fp16 with train.precision=bf16" in err[0], err
