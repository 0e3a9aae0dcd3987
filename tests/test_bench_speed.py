"""bench/ops_per_step.py and bench/gpu_side_by_side.py: what they derive from a run (the reference's arguments from
the recipe files, the phases, medians and ratios of the tables). Their full runs are real-size or need the
reference script; `bash bench/gpu_all.sh --cpu-smoke` runs the side by side at tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_arguments_follow_each_rows_recipe(tmp_path):
    side = load("gpu_side_by_side")
    args = side.argparse.Namespace(tiny=True, images=2, run_steps=1000, reference="train_amused.py",
                                   reference_precision="fp16")
    argv = {row: side.reference_argv(row, args, tmp_path, tmp_path / "out") for row in side.ROWS}
    value = lambda row, flag: argv[row][argv[row].index(flag) + 1]  # noqa: E731
    assert (value("nouns_256_lora_bs1x16", "--gradient_accumulation_steps"),
            value("minecraft_512_lora_bs1x8", "--gradient_accumulation_steps")) == ("16", "8")
    assert value("nouns_256_lora_bs1x16", "--lora_r") == "16" and value("nouns_256_lora_bs1x16", "--lora_alpha") == "32"
    assert "--use_8bit_adam" in argv["nouns_256_full8bit_bs1x16"] and "--use_lora" not in argv["nouns_256_full8bit_bs1x16"]
    assert value("nouns_256_full8bit_bs1x16", "--learning_rate") == "2e-05"
    assert value("nouns_256_lora_bs1x16", "--mixed_precision") == "no"  # tiny: fp32 on the CPU
    assert (tmp_path / "base-tiny" / "model_index.json").is_file() and len(list((tmp_path / "plain-tiny").glob("*.png"))) == 2


def test_side_by_side_summary_takes_the_last_timed_steps_and_the_ratios():
    side = load("gpu_side_by_side")
    runs = {"reference": [{"step_s": [9.0, 3.0, 3.2], "peak_gb": 4.6, "reserved_gb": 4.7},
                          {"step_s": [8.0, 3.4, 3.0], "peak_gb": 4.5, "reserved_gb": 4.7}],
            "kit": [{"step_s": [5.0, 2.0, 2.0, 120.0, 1.0, 1.2], "peak_gb": 2.2, "reserved_gb": 2.5, "compile_s": 118.0},
                    {"error": "RuntimeError: out of memory"}]}
    results = {"runs": {"nouns_256_lora_bs1x16": runs}, "timed": 2, "predicted_gb": {"nouns_256_lora_bs1x16": 2.0},
               "device": "GPU", "rounds": 2, "reference_precision": "fp16"}
    s = side.summarise(results)["nouns_256_lora_bs1x16"]
    assert s["reference"]["step_s"] == pytest.approx(3.1) and s["reference"]["steps_timed"] == 4
    assert s["kit"]["step_s"] == pytest.approx(1.1) and s["kit"]["compile_s"] == 118.0
    assert s["x_reference"] == pytest.approx(3.1 / 1.1) and s["peak_vs_predicted"] == pytest.approx(1.1)
    assert s["kit"]["errors"] == ["RuntimeError: out of memory"]
    results["summary"] = side.summarise(results)
    text = side.table(results)
    assert "| `nouns_256_lora_bs1x16` | 3.100 | 1.100 | — | 2.82 | 118 | 4.60 | 2.20 | 2.00 | 1.10 |" in text
    assert "out of memory" in text


def test_ops_table_splits_phases_views_and_host_syncs():
    ops = load("ops_per_step")
    step = {"ops": {"forward": 100, "backward": 120, "optimizer": 2, "other": 10, "end": 1},
            "views": {"forward": 40, "backward": 50}, "syncs": {"other": 1, "data": 2},
            "by_op": {"forward aten.mm.default": 30}, "sync_ops": {"other Tensor.tolist step.py:1": 1}}
    ref = {"ops": {"forward": 150, "backward": 170, "optimizer": 300, "encode": 60},
           "views": {"forward": 60, "backward": 70}, "syncs": {"optimizer": 30, "end": 3},
           "by_op": {}, "sync_ops": {}}
    results = {"sides": {"kit-cache": ops.summarise([step, step]), "reference": ops.summarise([ref])}}
    kit = results["sides"]["kit-cache"]
    assert kit["total"] == 233 and kit["views_total"] == 90 and kit["same_every_step"] and kit["steps_counted"] == 2
    text = ops.table(results)
    assert "| forward | 100 (60) | 150 (90) |" in text and "| **total** | 233 (143) | 680 (550) |" in text
    assert "forward + backward 220 = 0.69x the reference's 320" in text
    assert "host syncs inside the step 1, after it 0, in the data loader (host-side files) 2" in text
