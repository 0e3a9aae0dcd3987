"""Every bad input of docs/errors.md: one line on stderr (`amused-tune: error: ...`) naming the key or file and what
to do, a non-zero exit code, and nothing already written lost. One test per row of the table, in its order."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from amused_tune.train import checkpoints, outputs
from amused_tune.train import loop as trainer
from amused_tune.cli import main as cli_main
from conftest import make_images

REPO = Path(__file__).resolve().parent.parent


def base_recipe(data: Path, out: Path, **train) -> dict:
    return {
        "model": {"base": "tiny", "dtype": "fp32"},
        "data": {"source": "imagefolder", "path": str(data), "cache": False},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 2, "max_steps": 2, "precision": "fp32", "checkpoint_every": 2, **train},
        "validation": {"prompts": []},
        "output": {"dir": str(out), "loss_plot": False},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


@pytest.fixture
def recipe(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base_recipe(data, tmp_path / "run")))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data) -> Path:
    """A 2-step run of `base_recipe` (checkpoint at step 2), copied by the tests that need one."""
    root = tmp_path_factory.mktemp("finished")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(base_recipe(data, root / "run")))
    assert cli_main([str(path)]) == 0
    return root / "run"


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run whose recipe.yaml names the copy as its output.dir."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(str(finished_run), str(run)))
    return run


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, argv: list[str], *fragments: str, code: int | None = None, prefix: str = "amused-tune") -> str:
    """Run the CLI; assert a non-zero exit and exactly one error line holding every fragment. Returns the line."""
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert rc != 0 and (code is None or rc == code), (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    line = lines[0]
    assert line.startswith(f"{prefix}: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# --------------------------------------------------------------------------------------------- the recipe


def test_unknown_key(capsys, recipe):
    fails(capsys, [recipe, "--train.max_stepz=3"], "train.max_stepz is not a recipe key",
          "did you mean train.max_steps?", "train takes batch_size")


def test_unknown_section(capsys, recipe):
    fails(capsys, [recipe, "--trian.max_steps=3"], "trian.max_steps is not a recipe key", "did you mean train?")


def test_unknown_key_in_the_yaml_file(capsys, tmp_path, data):
    bad = base_recipe(data, tmp_path / "run")
    bad["optim"]["learning_rate"] = 1e-3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    fails(capsys, [tmp_path / "bad.yaml"], "optim.learning_rate is not a recipe key", "optim takes name, lr")


@pytest.mark.parametrize("override,fragments", [
    ("--train.max_steps=many", ("train.max_steps=many", "must be an integer")),
    ("--optim.lr=fast", ("optim.lr=fast", "must be a number")),
    ("--optim.scheduler=step", ("optim.scheduler=step", "one of 'constant', 'cosine', 'linear'")),
    ("--data.cache=maybe", ("data.cache=maybe", "true or false")),
])
def test_wrong_type(capsys, recipe, override, fragments):
    fails(capsys, [recipe, override], *fragments)


@pytest.mark.parametrize("override,key", [
    ("--optim.lr=0", "optim.lr"), ("--optim.lr=-1e-4", "optim.lr"), ("--train.batch_size=0", "train.batch_size"),
    ("--train.batch_size=-2", "train.batch_size"), ("--train.max_steps=0", "train.max_steps"),
    ("--train.grad_accum=0", "train.grad_accum"),
])
def test_negative_or_zero_lr_batch_steps(capsys, recipe, override, key):
    fails(capsys, [recipe, override], f"{key} must be > 0")


def test_recipe_file_that_does_not_exist(capsys, tmp_path):
    fails(capsys, [tmp_path / "nope.yaml"], "nope.yaml not found", "amused-tune recipes")


# --------------------------------------------------------------------------------------------- the base model


def test_missing_base_path(capsys, recipe, tmp_path):
    fails(capsys, [recipe, f"--model.base={tmp_path / 'no-such-model'}"], "model.base=", "does not exist")


def test_base_folder_that_is_not_a_pipeline(capsys, recipe, tmp_path):
    (tmp_path / "half").mkdir()
    fails(capsys, [recipe, f"--model.base={tmp_path / 'half'}"], "model.base=", "lacks transformer")


def test_hub_id_offline(capsys, recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (also set for the whole suite by conftest)
    fails(capsys, [recipe, "--model.base=amused-tune-tests/not-cached"], "model.base='amused-tune-tests/not-cached'",
          "not in the Hugging Face cache", "hf download amused-tune-tests/not-cached --local-dir")


def test_resolution_not_matching_the_base_model(capsys, recipe):
    fails(capsys, [recipe, "--model.resolution=256"], "model.resolution=256", "set model.resolution=32")


# --------------------------------------------------------------------------------------------- adapters


def test_checkpoint_of_another_rank(capsys, tmp_path, finished_run):
    other = tmp_path / "r8.yaml"
    (other).write_text((finished_run.parent / "recipe.yaml").read_text().replace("rank: 4", "rank: 8"))
    fails(capsys, [other, f"--output.dir={tmp_path / 'r8'}", f"--train.resume={finished_run / 'checkpoints/step-2'}"],
          "was written for another adapter or base model", "shape (4, 64) there, (8, 64) here", "recipe.yaml")


def test_checkpoint_of_another_adapter_kind(capsys, tmp_path, finished_run):
    fails(capsys, [finished_run.parent / "recipe.yaml", "--adapter.kind=full", f"--output.dir={tmp_path / 'full'}",
                   f"--train.resume={finished_run}"], "was written for another adapter or base model")


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, finished_run) -> Path:
    """Adapters made for another base: wider layers (same names), other module names, and a pickle file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("adapters")
    src = finished_run / "adapter" / "pytorch_lora_weights.safetensors"
    state = load_file(src)
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if ".lora_A." in k else v for k, v in state.items()}
    renamed = {k.replace("transformer.", "transformer.other_net."): v for k, v in state.items()}
    for name, weights in (("wide", wide), ("renamed", renamed)):
        (root / name).mkdir()
        save_file(weights, root / name / "pytorch_lora_weights.safetensors", metadata=meta)
    torch.save(state, root / "lora.bin")
    return root


def sample_argv(adapter) -> list[str]:
    return ["sample", "--base", "tiny", "--prompt", "x", "--steps", "2", "--adapter", str(adapter)]


def test_adapter_of_another_base_wider_layers(capsys, tmp_path, bad_adapters):
    fails(capsys, sample_argv(bad_adapters / "wide") + ["--out", tmp_path], "has shape (4, 128)",
          "needs (4, 64)", "another base model", prefix="amused-tune sample")


def test_adapter_of_another_base_other_modules(capsys, tmp_path, bad_adapters):
    fails(capsys, sample_argv(bad_adapters / "renamed") + ["--out", tmp_path], "trained on another base model",
          prefix="amused-tune sample")


def test_pickle_adapter_is_refused_unless_allowed(capsys, tmp_path, bad_adapters):
    fails(capsys, sample_argv(bad_adapters / "lora.bin") + ["--out", tmp_path], "pickle", "--allow-pickle",
          prefix="amused-tune sample")
    assert not list(tmp_path.glob("*.png"))
    assert cli_main(sample_argv(bad_adapters / "lora.bin") + ["--out", str(tmp_path), "--allow-pickle"]) == 0


# --------------------------------------------------------------------------------------------- data


def test_dataset_path_that_does_not_exist(capsys, recipe, tmp_path):
    fails(capsys, [recipe, f"--data.path={tmp_path / 'no-such-data'}"], "data.path=", "does not exist")


def test_empty_dataset(capsys, recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    fails(capsys, [recipe, f"--data.path={tmp_path / 'empty'}"], "no usable samples", str(tmp_path / "empty"))


def test_folder_without_captions(capsys, recipe, tmp_path):
    make_images(tmp_path / "nocaps", captions=False)
    fails(capsys, [recipe, f"--data.path={tmp_path / 'nocaps'}"], "no metadata.jsonl", "data.source=captionfolder")


# --------------------------------------------------------------------------------------------- the output dir


def test_output_dir_of_another_recipe(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    fails(capsys, [run / "recipe.yaml", "--optim.lr=5e-4"], f"output.dir={run}", "different recipe",
          "--output.overwrite=true")
    assert snapshot(run) == before


def test_restarting_a_run_with_resume_none(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    fails(capsys, [run / "recipe.yaml", "--train.resume=none"], "already holds a run", "--train.resume=auto")
    assert snapshot(run) == before


def test_overwrite_of_the_run_being_resumed(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    fails(capsys, [run / "recipe.yaml", "--optim.lr=5e-4", "--output.overwrite=true",
                   f"--train.resume={run / 'checkpoints/step-2'}"], "is inside output.dir", "pick another output.dir")
    assert snapshot(run) == before


def test_read_only_output_dir(capsys, recipe, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")  # tests run as root: chmod would not stop the writes
    fails(capsys, [recipe, f"--output.dir={tmp_path / 'a-file' / 'run'}"], "is not writable", "pick another output.dir")


def test_read_only_when_checkpointing(capsys, recipe, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", args[1] if len(args) > 1 else None)

    monkeypatch.setattr(checkpoints, "save_file", refuse)
    fails(capsys, [recipe], "read-only file system while writing checkpoint step 2 to", "trainable.safetensors",
          "rerun the same command", code=74)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_full_disk(capsys, tmp_path, finished_run, monkeypatch, where):
    run = copy_run(finished_run, tmp_path)
    kept = snapshot(run / "checkpoints")
    if where == "checkpoint":
        original = checkpoints.save_file

        def full(tensors, path, *args, **kwargs):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoints, "save_file", full)
    else:
        def full(self, row):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

        monkeypatch.setattr(outputs.MetricsFile, "write", full)
    fails(capsys, [run / "recipe.yaml", "--train.max_steps=4"], "disk full while writing", "free on that disk",
          "free space", "rerun the same command", code=74)
    assert snapshot(run / "checkpoints") == kept  # the step-2 checkpoint is untouched, no partial folder is left
    assert [r["step"] for r in outputs.read_metrics(run / "metrics.jsonl")][:2] == [1, 2]
    if where == "checkpoint":
        monkeypatch.setattr(checkpoints, "save_file", original)
        assert cli_main([str(run / "recipe.yaml"), "--train.max_steps=4"]) == 0  # and the run resumes
        assert [r["step"] for r in outputs.read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------- resume paths


def test_resume_path_without_a_checkpoint(capsys, recipe, tmp_path):
    fails(capsys, [recipe, f"--train.resume={tmp_path / 'nowhere'}"], "train.resume=", "no readable checkpoint")


def test_resume_path_of_a_corrupt_checkpoint(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path)
    weights = run / "checkpoints" / "step-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    fails(capsys, [run / "recipe.yaml", f"--output.dir={tmp_path / 'next'}", f"--train.resume={run / 'checkpoints/step-2'}"],
          "step-2 is corrupt", "train.resume")


# --------------------------------------------------------------------------------------------- training


def test_nonfinite_loss(capsys, recipe, tmp_path):
    # an absurd lr: the first step sends the LoRA weights to ~1e30, the second forward overflows
    fails(capsys, [recipe, "--optim.lr=1e30"], "non-finite loss (nan) at step 2", "no checkpoint had been written",
          "--train.skip_nonfinite=true", "optim.lr", code=1)


def test_nonfinite_loss_after_a_checkpoint(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    fails(capsys, [run / "recipe.yaml", "--optim.lr=1e30", f"--output.dir={tmp_path / 'hot'}",
                   f"--train.resume={run}", "--train.max_steps=6"],
          "non-finite loss (nan) at step 4", "--train.skip_nonfinite=true", code=1)
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------- launch


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_launch_is_refused(capsys, recipe, monkeypatch, kind):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    fails(capsys, [recipe], f"accelerate launch with {kind} is not supported", "--multi_gpu", "docs/distributed.md")
    assert not (Path(yaml.safe_load(recipe.read_text())["output"]["dir"]) / "recipe.yaml").exists()


def test_base_folder_with_only_pickle_weights_is_refused(tmp_path):
    from amused_tune.model.bases import BaseModelError, build_tiny, load_components

    comps = build_tiny()
    comps.save_pretrained(tmp_path / "base")
    (tmp_path / "base/transformer/diffusion_pytorch_model.safetensors").unlink()
    comps.transformer.save_pretrained(tmp_path / "base/transformer", safe_serialization=False)
    assert (tmp_path / "base/transformer/diffusion_pytorch_model.bin").is_file()
    with pytest.raises(BaseModelError, match="safetensors"):
        load_components(str(tmp_path / "base"))
