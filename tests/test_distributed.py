"""Two processes on the CPU (DDP over gloo), launched as a user would: `accelerate launch --multi_gpu
--num_processes 2 -m amused_tune.cli RECIPE` (with no GPU, accelerate runs the processes on the CPU).

Note: `accelerate launch --cpu --num_processes 2` does not start two processes (without mpirun it runs the script
once); see docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from amused_tune.train import checkpoints, outputs
from conftest import make_images

REPO = Path(__file__).resolve().parent.parent


def launch(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "amused_tune.cli", str(recipe), "--train.device=cpu", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_train_save_once_and_resume_exactly(tmp_path):
    """Two processes, with a LoRA on the U-ViT (with dropout) and on the text encoder, and a validation grid on the
    main process: the run ends, saves both adapters once, resumes exactly."""
    data = make_images(tmp_path / "data")
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"base": "tiny", "dtype": "fp32"},
        "data": {"source": "imagefolder", "path": str(data), "cache": False, "random_flip": True},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.1, "text_encoder": True},
        "optim": {"lr": 2e-3},
        "train": {"batch_size": 1, "grad_accum": 2, "max_steps": 4, "precision": "fp32", "checkpoint_every": 2,
                  "keep_checkpoints": 3, "cond_dropout": 0.5},
        "validation": {"prompts": ["a red square"], "every": 2, "steps": 2},
        "output": {"dir": str(out), "loss_plot": False},
    }))
    done = launch(recipe)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("done: step 4") == 1  # the main process reports

    # the main process wrote everything, once
    rows = outputs.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors",
            "text_encoder"} <= {p.name for p in (out / "adapter").iterdir()}
    assert [p.name for p in checkpoints.list_checkpoints(out / "checkpoints")] == ["step-2", "step-4"]
    assert not list((out / "checkpoints").glob(".*"))
    # images per step count both processes: 1 image x 2 micro-batches x 2 processes
    meta = json.loads((out / "checkpoints" / "step-4" / "meta.json").read_text())
    assert meta["num_processes"] == 2 and meta["effective_batch"] == 4 and meta["samples_per_process"] == 8
    # every process's generators are in the checkpoint, and they differ (each draws its own masks)
    state = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generators"]["mask"], state["rng"][1]["generators"]["mask"])
    # ... and its own LoRA dropout: the processes' torch RNGs (seeded per process after the LoRA init) differ
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # both adapters saved: the U-ViT's and the text encoder's
    saved = load_file(out / "adapter" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("transformer.") for k in saved)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["before_after.png", "step-0.png", "step-2.png", "step-4.png"]

    # stop after step 2 (as if killed), resume with two processes: the same weights and losses as straight through
    reference = load_file(out / "checkpoints" / "step-4" / "trainable.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "adapter")
    resumed = launch(recipe)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and resumed.stdout.count("resumed from") == 1
    again = load_file(out / "checkpoints" / "step-4" / "trainable.safetensors")
    for name, weight in reference.items():
        assert torch.equal(weight, again[name]), name
    assert [(r["step"], r["loss"]) for r in outputs.read_metrics(out / "metrics.jsonl")] == [
        (r["step"], r["loss"]) for r in rows]
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
