"""Issue 7, "nothing lost": checkpoints, resume, signals, non-finite steps (tiny model, CPU, fp32).

The reference for every resume is a straight run of the same recipe: a resumed run must end with bit-identical
trainable weights and the same metrics.jsonl losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from amused_tune.train import checkpoints, outputs
from amused_tune.train import step as train_step
from amused_tune.train import stops
from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.recipe import Recipe
from amused_tune.train.loop import TrainingStopped, train
from conftest import make_images, reset_accelerate
from helpers import assert_same_run, final_weights, losses, recipe_for

REPO = Path(__file__).resolve().parent.parent


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(json.dumps(recipe.to_dict())))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


# --------------------------------------------------------------------------------------------- 2N == N + N


@pytest.mark.parametrize("kind,adam_8bit", [("lora", False), ("lora", True), ("full", True)])
def test_n_steps_then_resumed_n_more_equals_2n_steps(tmp_path, data, kind, adam_8bit):
    train(recipe_for(tmp_path / "straight", data, kind, adam_8bit, max_steps=4))
    reset_accelerate()
    first = train(recipe_for(tmp_path / "resumed", data, kind, adam_8bit, max_steps=2))
    assert first["step"] == 2
    reset_accelerate()
    second = train(recipe_for(tmp_path / "resumed", data, kind, adam_8bit, max_steps=4))  # train.resume=auto
    assert second["step"] == 4
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert [s for s, _ in losses(tmp_path / "resumed")] == [1, 2, 3, 4]
    # the checkpoint holds the resolved recipe and every process's RNG states
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-4"
    assert yaml.safe_load((ckpt / "recipe.yaml").read_text())["adapter"]["kind"] == kind
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["recipe"]["train"]["batch_size"] == 2 and meta["samples_per_process"] == 16
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert len(state["rng"]) == 1 and {"mask", "dropout", "data"} <= state["rng"][0]["generators"].keys()


@pytest.mark.parametrize("data_cfg", [{"cache": True}, {"num_workers": 2}], ids=["cache", "two-workers"])
def test_resume_is_exact_with_the_cache_and_with_data_workers(tmp_path, data, data_cfg):
    """Random flips drawn in the cache (two variants per image) or in two worker processes: 2 + 2 steps == 4."""
    def run(name: str, steps: int, **data_overrides) -> dict:
        recipe = recipe_for(tmp_path / name, data, max_steps=steps)
        recipe.data.__dict__.update({"cache_dir": str(tmp_path / "cache"), **data_cfg, **data_overrides})
        reset_accelerate()
        return train(recipe)

    run("straight", 4)
    run("resumed", 2)
    assert run("resumed", 4)["step"] == 4
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    run("in-process", 4, num_workers=0)  # the workers change nothing either
    assert_same_run(tmp_path / "straight", tmp_path / "in-process")


def test_sigterm_mid_run_saves_exits_143_and_resumes_exactly_with_a_cosine_schedule(tmp_path, data, monkeypatch):
    sched = {"scheduler": "cosine", "warmup_steps": 2}
    straight = recipe_for(tmp_path / "straight", data, max_steps=5, checkpoint_every=100)
    straight.optim.__dict__.update(sched)
    train(straight)
    reset_accelerate()

    calls = {"n": 0}
    original = train_step.compute_loss

    def signal_during_step_3(*args, **kwargs):  # 2 micro-batches per step: call 5 is in step 3
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_step, "compute_loss", signal_during_step_3)
    previous_handler = signal.getsignal(signal.SIGTERM)
    stopped = recipe_for(tmp_path / "stopped", data, max_steps=5, checkpoint_every=100)
    stopped.optim.__dict__.update(sched)
    with pytest.raises(TrainingStopped) as info:
        train(stopped)
    assert info.value.exit_code == 143 and not info.value.error
    assert "after step 3" in str(info.value) and "--train.resume=auto" in str(info.value)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "stopped" / "checkpoints")] == ["step-3"]
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # the handlers are given back
    monkeypatch.setattr(train_step, "compute_loss", original)
    reset_accelerate()
    train(stopped)
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")


def test_stop_flag_second_signal_is_acknowledged_third_aborts(capsys, monkeypatch):
    clock = iter([100.0, 100.3, 102.0, 104.0])
    monkeypatch.setattr(stops.time, "monotonic", lambda: next(clock))
    flag = stops.StopFlag()
    flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGINT, None)  # 0.3 s later: the launcher forwarding the same Ctrl-C
    assert flag.count == 1 and "already stopping" not in capsys.readouterr().err
    flag._handle(signal.SIGINT, None)  # during the save: acknowledged, the save goes on
    assert flag.signum == signal.SIGINT
    assert "already stopping" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)


# --------------------------------------------------------------------------------------------- auto resume


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, data, caplog):
    train(recipe_for(tmp_path / "straight", data, max_steps=6))
    reset_accelerate()
    run = tmp_path / "run"
    train(recipe_for(run, data, max_steps=4))
    newest = run / "checkpoints" / "step-4" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a half-written file
    (run / "checkpoints" / ".tmp-step-6-999").mkdir()  # a save that was killed
    reset_accelerate()
    with caplog.at_level("WARNING"):
        train(recipe_for(run, data, max_steps=6))
    assert "step-4 is corrupt" in caplog.text
    assert_same_run(tmp_path / "straight", run)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # swept by the next save


def test_a_finished_run_says_so_exits_0_and_restores_missing_final_weights(tmp_path, data, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(to_yaml(recipe_for(tmp_path / "run", data, max_steps=2)))
    assert cli_main([str(recipe_file)]) == 0
    capsys.readouterr()
    reset_accelerate()
    import shutil

    shutil.rmtree(tmp_path / "run" / "adapter")  # stopped between the last checkpoint and the final save
    assert cli_main([str(recipe_file)]) == 0
    assert "already reached train.max_steps=2" in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2]


def test_resume_from_an_explicit_checkpoint_path(tmp_path, data):
    train(recipe_for(tmp_path / "straight", data, max_steps=4))
    reset_accelerate()
    train(recipe_for(tmp_path / "first", data, max_steps=2))
    reset_accelerate()
    recipe = recipe_for(tmp_path / "second", data, max_steps=4,
                        resume=str(tmp_path / "first" / "checkpoints" / "step-2"))
    assert train(recipe)["step"] == 4
    for name, w in final_weights(tmp_path / "straight").items():
        assert torch.equal(w, final_weights(tmp_path / "second")[name])


def test_output_dir_guard(tmp_path, data):
    run = tmp_path / "run"
    train(recipe_for(run, data, max_steps=2))
    before = (run / "metrics.jsonl").read_text()
    other = recipe_for(run, data, max_steps=2)
    other.optim.lr = 1e-4
    from amused_tune.recipe import RecipeError

    reset_accelerate()
    with pytest.raises(RecipeError, match="different recipe.*--output.overwrite=true"):
        train(other)
    fresh = recipe_for(run, data, max_steps=2, resume="none")
    with pytest.raises(RecipeError, match="train.resume=none would start it over"):
        train(fresh)
    assert (run / "metrics.jsonl").read_text() == before and checkpoints.list_checkpoints(run / "checkpoints")
    # a failed start (nothing trained) does not claim the folder for its recipe
    empty = tmp_path / "claimed"
    empty.mkdir()
    (empty / "recipe.yaml").write_text("# fingerprint: 0123456789abcdef\n")
    reset_accelerate()
    assert train(recipe_for(empty, data, max_steps=1))["step"] == 1
    # overwrite discards the other run, then trains
    other.output.overwrite = True
    reset_accelerate()
    assert train(other)["step"] == 2
    meta = json.loads((run / "checkpoints" / "step-2" / "meta.json").read_text())
    assert meta["recipe_fingerprint"] == outputs.recipe_fingerprint(other)


# --------------------------------------------------------------------------------------------- non-finite


def nan_at_step(monkeypatch, step: int, grad_accum: int = 2) -> None:
    original = train_step.compute_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if (calls["n"] - 1) // grad_accum + 1 == step else loss

    monkeypatch.setattr(train_step, "compute_loss", patched)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch):
    nan_at_step(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as info:
        train(recipe_for(run, data, max_steps=4))
    assert info.value.error and info.value.exit_code == 1
    assert "non-finite loss (nan) at step 3" in str(info.value) and "step-2" in str(info.value)
    assert [p.name for p in checkpoints.list_checkpoints(run / "checkpoints")] == ["step-2"]
    checkpoints.load_checkpoint(run / "checkpoints" / "step-2")
    assert [s for s, _ in losses(run)] == [1, 2]


def test_nonfinite_gradient_with_a_finite_loss_stops_too(tmp_path, data, monkeypatch):
    original = train_step.compute_loss

    def nan_gradient(batch, transformer, *args, **kwargs):
        loss = original(batch, transformer, *args, **kwargs)
        p = next(p for p in transformer.parameters() if p.requires_grad)
        return loss + torch.sqrt(p.sum() * 0.0)  # adds 0 to the loss, NaN to the gradient

    monkeypatch.setattr(train_step, "compute_loss", nan_gradient)
    with pytest.raises(TrainingStopped, match=r"non-finite gradient norm \(nan\) at step 1"):
        train(recipe_for(tmp_path / "run", data, max_steps=2))


def test_skip_nonfinite_skips_and_counts_in_metrics_and_checkpoints(tmp_path, data, monkeypatch):
    nan_at_step(monkeypatch, 2)
    run = tmp_path / "run"
    summary = train(recipe_for(run, data, max_steps=3, skip_nonfinite=True))
    assert summary["step"] == 3 and summary["skipped_nonfinite"] == 1
    rows = outputs.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["skipped_nonfinite"] == 1 and rows[2]["skipped_nonfinite"] == 1
    assert json.loads((run / "checkpoints" / "step-2" / "meta.json").read_text())["skipped_nonfinite"] == 1
    # the skipped step changed no weight
    w1 = checkpoints.load_checkpoint(run / "checkpoints" / "step-2")[0]
    reset_accelerate()
    monkeypatch.undo()
    ref = tmp_path / "ref"
    train(recipe_for(ref, data, max_steps=1, checkpoint_every=1))
    for name, w in final_weights(ref).items():
        assert torch.equal(w, w1[name])


# --------------------------------------------------------------------------------------------- real processes

RUNNER = r'''
"""Runs the CLI with test hooks: a slow step (RUNNER_STEP_DELAY) and a slow checkpoint save (RUNNER_SLOW_SAVE=STEP:S
or *:S) that touches RUNNER_MARKER once the weights file of that save is written."""
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from amused_tune.train import checkpoints
from amused_tune.train import step as train_step
from amused_tune.train import stops

delay = float(os.environ.get("RUNNER_STEP_DELAY", "0"))
if delay:
    original_loss = train_step.compute_loss
    def slow_loss(*args, **kwargs):
        time.sleep(delay)
        return original_loss(*args, **kwargs)
    train_step.compute_loss = slow_loss

if os.environ.get("RUNNER_SLOW_SAVE"):
    at, seconds = os.environ["RUNNER_SLOW_SAVE"].split(":")
    original_save = checkpoints.save_file
    def slow_save(tensors, path, *args, **kwargs):
        original_save(tensors, path, *args, **kwargs)
        if at == "*" or f"{checkpoints.TMP_PREFIX}{at}-" in str(path):
            Path(os.environ["RUNNER_MARKER"]).write_text(str(path))
            time.sleep(float(seconds))
    checkpoints.save_file = slow_save

from amused_tune.cli import main
sys.exit(main())
'''


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, data):
    """A recipe file, a runner script, and the straight 6-step reference run (in this process)."""
    root = tmp_path_factory.mktemp("cli")
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(to_yaml(recipe_for(root / "unused", data, max_steps=6)))
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    reset_accelerate()
    assert cli_main([str(recipe_file), f"--output.dir={root / 'reference'}"]) == 0
    reset_accelerate()
    return recipe_file, runner, root / "reference"


def start(runner: Path, recipe_file: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(runner), str(recipe_file), f"--output.dir={out}"],
        env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, cli_setup):
    recipe_file, runner, reference = cli_setup
    out, marker = tmp_path / "run", tmp_path / "saving"
    proc = start(runner, recipe_file, out, {"RUNNER_SLOW_SAVE": "4:60", "RUNNER_MARKER": str(marker)})
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    ckpts = out / "checkpoints"
    assert [p.name for p in checkpoints.list_checkpoints(ckpts)] == ["step-2"]
    assert list(ckpts.glob(".tmp-step-4-*"))  # the half-written one, never renamed into place
    assert cli_main([str(recipe_file), f"--output.dir={out}"]) == 0  # resume=auto
    assert_same_run(reference, out)
    assert not list(ckpts.glob(".tmp-*"))


@pytest.mark.slow
def test_sigint_twice_saves_exits_130_and_resumes_to_the_same_weights(tmp_path, cli_setup):
    recipe_file, runner, reference = cli_setup
    out, marker = tmp_path / "run", tmp_path / "saving"
    proc = start(runner, recipe_file, out, {"RUNNER_STEP_DELAY": "0.15", "RUNNER_SLOW_SAVE": "*:3",
                                            "RUNNER_MARKER": str(marker)})
    wait_for(lambda: len(losses(out)) >= 3, proc)  # past the step-2 checkpoint
    marker.unlink(missing_ok=True)
    proc.send_signal(signal.SIGINT)
    first = time.monotonic()
    wait_for(marker.exists, proc)  # the signal's checkpoint is being written
    time.sleep(max(0.0, first + 1.2 - time.monotonic()))  # (signals within 1 s count as one Ctrl-C)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C during the save
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    stopped_at = max(checkpoints.step_of(p) for p in checkpoints.list_checkpoints(out / "checkpoints"))
    assert 3 <= stopped_at < 6
    for path in checkpoints.list_checkpoints(out / "checkpoints"):
        checkpoints.load_checkpoint(path)  # both the previous and the new checkpoint are complete
    assert "already stopping" in err
    assert f"after step {stopped_at}" in err and "--train.resume=auto" in err
    assert cli_main([str(recipe_file), f"--output.dir={out}"]) == 0
    assert_same_run(reference, out)
