"""train.compile: auto is off on the CPU and with a quantized base; on CUDA it compiles after the first timed steps
when the steps left repay the compile time, and the compile time reaches metrics.jsonl (the GPU itself is not
needed to check the decision and its wiring)."""

from __future__ import annotations

import pytest
import torch

from amused_tune.train import compiling, outputs
from amused_tune.train.loop import train
from helpers import tiny

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_off_on_the_cpu_and_with_a_quantized_base_and_true_false_mean_what_they_say():
    assert compiling.mode("auto", CPU, quantized=False) == "off"
    assert compiling.mode("auto", CUDA, quantized=False) == "auto"
    assert compiling.mode("auto", CUDA, quantized=True) == "off"
    assert compiling.mode(True, CPU, quantized=False) == "on"
    assert compiling.mode(False, CUDA, quantized=False) == "off"


def test_compiling_repays_only_when_the_steps_left_save_twice_the_compile_time():
    # a 256 LoRA bs1x16 step on a GPU: ~3.4 s eager; the saving per step at 1.5x is 1.13 s, twice 150 s is 300 s
    assert compiling.repays([9.0, 3.4, 3.4], steps_left=300)  # 300 x 1.13 = 340 s > 300 s
    assert not compiling.repays([9.0, 3.4, 3.4], steps_left=250)  # 283 s
    assert not compiling.repays([300.0, 0.2, 0.2], steps_left=1000)  # the first step (lazy set-up) is not used
    assert compiling.repays([0.2, 0.2], steps_left=10, compile_s=0.1, speedup=2.0)
    assert not compiling.repays([], steps_left=10_000) and not compiling.repays([3.0, 3.0], steps_left=0)


def test_clock_compiles_after_the_eager_steps_and_reports_the_compile_time_once():
    clock = compiling.CompileClock("auto", CUDA, quantized=False, max_steps=1000)
    assert [clock.after_step(s, 3.0) for s in (1, 2)] == [(False, {})] * 2
    assert clock.after_step(3, 3.0) == (True, {})
    assert clock.after_step(4, 123.0) == (False, {"compile_s": 120.0})  # the first compiled step less an eager one
    assert clock.after_step(5, 1.5) == (False, {})
    short = compiling.CompileClock("auto", CUDA, quantized=False, max_steps=20)
    assert [short.after_step(s, 3.0)[0] for s in range(1, 21)] == [False] * 20 and short.mode == "off"
    on = compiling.CompileClock(True, CPU, quantized=False, max_steps=10)  # compiled from the start: step 2 tells
    assert on.after_step(1, 100.0) == (False, {}) and on.after_step(2, 4.0) == (False, {"compile_s": 96.0})
    off = compiling.CompileClock("auto", CPU, quantized=False, max_steps=10**6)
    assert all(off.after_step(s, 60.0) == (False, {}) for s in range(1, 6))


def test_auto_compiles_the_uvit_the_step_calls_and_writes_compile_s(tmp_path, image_folder, monkeypatch):
    """The loop's wiring, on the CPU: auto made to decide as on CUDA (and a stand-in for torch.compile)."""
    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    monkeypatch.setattr(compiling, "mode", lambda setting, device, quantized: "auto")
    monkeypatch.setattr(compiling, "repays", lambda seconds, left, **k: len(seconds) == 3 and left == 2)
    monkeypatch.setattr(compiling, "compiled", Compiled)
    train(tiny(tmp_path, image_folder, train={"max_steps": 5, "compile": "auto"}))
    rows = outputs.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert len(calls) == 2  # steps 4 and 5 call the compiled U-ViT, one micro-batch each
    assert [("compile_s" in r) for r in rows] == [False, False, False, True, False]
    assert rows[3]["compile_s"] >= 0


def test_default_run_on_the_cpu_does_not_compile(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(compiling, "compiled", lambda module: pytest.fail("compiled on the CPU"))
    train(tiny(tmp_path, image_folder, train={"max_steps": 4}))
    assert not any("compile_s" in r for r in outputs.read_metrics(tmp_path / "run" / "metrics.jsonl"))
