"""Every command against a full disk, a read-only output folder and a missing input (docs/errors.md, "Full disk,
read-only folder, missing path"): one line on stderr, no traceback, the documented exit code (74 for a failed
write, 2 for a bad input), no truncated or temporary file left, and the same command finishes once the fault is
gone.

The faults are real where the tests may mount (root): a small tmpfs under the test's folder, made full with a
ballast file and read-only with a remount. Elsewhere the kit's write seam (`amused_tune.writes.sync`, which every
written file passes before its rename) raises ENOSPC once the bytes written pass a budget, and EROFS for a
read-only folder (os.access then says it is not writable, as it does on a read-only mount).

Training runs use the tiny base: a run whose prior draw or checkpoint hit a full disk, rerun once space is freed,
ends with the adapter and losses of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from amused_tune import writes
from amused_tune.cli import main as cli_main
from amused_tune.train import checkpoints, outputs
from amused_tune.writes import WRITE_FAILED
from conftest import make_images, reset_accelerate
from helpers import captioner  # noqa: F401  (a fixture: a tiny BLIP saved like a Hub model)

DISK_SIZE = 64 << 20


def can_mount() -> bool:
    """Root with mount(8), unless AMUSED_TUNE_TEST_WRITE_SEAM=1 asks for the write seam (how non-root runs go)."""
    if os.environ.get("AMUSED_TUNE_TEST_WRITE_SEAM") == "1":
        return False
    return os.geteuid() == 0 and shutil.which("mount") is not None


class Disk:
    """A folder whose disk can be made full or read-only: a tmpfs where mounting works, else the write seam."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.monkeypatch = root, monkeypatch
        root.mkdir(parents=True)
        self.real = can_mount() and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(root)], capture_output=True).returncode == 0
        self.ballast = root / "ballast"
        self.budget: int | None = None
        self.read_only_now = False
        if not self.real:
            real_sync, real_access = writes.sync, os.access

            def sync(path):
                if self.read_only_now and self.inside(path):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                size = Path(path).stat().st_size
                if self.budget is not None and self.inside(path):
                    if size > self.budget:
                        with open(path, "r+b") as fh:  # what a full disk leaves: the bytes that fitted
                            fh.truncate(self.budget)
                        self.budget = 0
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                    self.budget -= size
                real_sync(path)

            def access(path, mode, *args, **kwargs):
                if self.read_only_now and mode & os.W_OK and self.inside(path):
                    return False
                return real_access(path, mode, *args, **kwargs)

            monkeypatch.setattr(writes, "sync", sync)
            monkeypatch.setattr(os, "access", access)

    def inside(self, path) -> bool:
        return Path(path).absolute().is_relative_to(self.root.absolute())

    def fill(self, leave: int = 0) -> None:
        """Make the disk full, but for about `leave` bytes."""
        if not self.real:
            self.budget = leave
            return
        with open(self.ballast, "ab", buffering=0) as fh:
            block = b"\0" * (1 << 20)
            while True:
                try:
                    fh.write(block)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
                    block = block[: len(block) // 2]
                    if len(block) < 512:
                        break
        if leave:
            os.truncate(self.ballast, max(0, self.ballast.stat().st_size - leave))

    def free(self) -> None:
        self.budget = None
        self.ballast.unlink(missing_ok=True)

    def read_only(self, on: bool = True) -> None:
        self.read_only_now = on
        if self.real:
            subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.root)], check=True)

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch)
    yield d
    d.close()


def one_line(capsys, code: int, *fragments: str, prefix: str = "amused-tune") -> str:
    """The command's stderr is exactly one line: `PREFIX: error: ...` holding every fragment; no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not is_progress(line)]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def is_progress(line: str) -> bool:
    """A progress bar's line (tqdm draws on stderr while a command works)."""
    return "it/s]" in line or "s/it]" in line or "|" in line and "%" in line


def run(argv, code: int) -> None:
    rc = cli_main([str(a) for a in argv])
    reset_accelerate()
    assert rc == code, rc


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of a write that did not finish."""
    return sorted(str(p) for p in folder.rglob(f"{writes.TMP_PREFIX}*")) if folder.exists() else []


# --------------------------------------------------------------------------------------------- training


def recipe_file(folder: Path, data: Path, out: Path) -> Path:
    """A tiny LoRA run with prior preservation: 4 steps, checkpoints at 2 and 4."""
    recipe = {
        "model": {"base": "tiny", "dtype": "fp32"},
        "data": {"source": "imagefolder", "path": str(data), "cache": False, "random_flip": True},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "optim": {"lr": 2e-3},
        "train": {"batch_size": 2, "max_steps": 4, "precision": "fp32", "checkpoint_every": 2, "keep_checkpoints": 3,
                  "cond_dropout": 0.5},
        "prior": {"prompts": ["a cat", "a red house"], "images_per_prompt": 2, "weight": 0.5, "seed": 3},
        "validation": {"prompts": []},
        "output": {"dir": str(out), "loss_plot": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("straight")
    assert cli_main([str(recipe_file(root, data, root / "run"))]) == 0
    reset_accelerate()
    return root / "run"


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in outputs.read_metrics(out / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = (load_file(r / "adapter" / "pytorch_lora_weights.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a) == losses(b) and len(losses(a)) == 4


def test_train_full_disk_during_the_prior_draw_then_the_rerun_draws_again(disk, data, straight, capsys,
                                                                         monkeypatch):
    from amused_tune.sampling import sampler

    recipe = recipe_file(disk.root / "r", data, disk.root / "run")
    real = sampler.sample_tokens
    filled = []

    def draw_on_a_full_disk(*args, **kwargs):  # the disk fills up while the base draws the prior images
        if not filled:
            disk.fill()
            filled.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "sample_tokens", draw_on_a_full_disk)
    run([recipe], WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "disk full while writing the prior images to", "prior.safetensors",
             "free on that disk", "free space", "rerun the same command")
    prior = disk.root / "run" / "prior"
    assert not (prior / "prior.safetensors").exists() and not (prior / "prior.json").exists()
    assert leftovers(disk.root / "run") == [] and not (disk.root / "run" / "checkpoints").exists()

    disk.free()
    monkeypatch.setattr(sampler, "sample_tokens", real)
    run([recipe], 0)
    assert (prior / "prior.safetensors").is_file() and (prior / "prior.json").is_file()
    assert_same_run(straight, disk.root / "run")


def test_train_full_disk_during_a_checkpoint_then_the_rerun_resumes_bit_exactly(disk, data, straight, capsys,
                                                                               monkeypatch):
    recipe = recipe_file(disk.root / "r", data, disk.root / "run")
    real = checkpoints.save_checkpoint

    def save_on_a_full_disk(root, step, *args, **kwargs):
        if step == 4:
            disk.fill(leave=8 << 10)  # the first files of the checkpoint fit, the rest do not
        return real(root, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_on_a_full_disk)
    run([recipe], WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "disk full while writing checkpoint step 4 to", "checkpoints/step-4/",
             "free space", "it resumes from the last complete checkpoint")
    ckpts = disk.root / "run" / "checkpoints"
    assert [p.name for p in checkpoints.list_checkpoints(ckpts)] == ["step-2"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]  # no partial step-4 folder
    assert not (disk.root / "run" / "adapter").exists()

    disk.free()
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    run([recipe], 0)
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(straight, disk.root / "run")


def test_train_read_only_output_folder(disk, data, straight, capsys):
    recipe = recipe_file(disk.root / "r", data, disk.root / "run")
    (disk.root / "run").mkdir()
    disk.read_only()
    run([recipe], WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "read-only file system while writing the resolved recipe to", "recipe.yaml",
             "writable or pick another output.dir")
    disk.read_only(False)
    run([recipe], 0)
    assert_same_run(straight, disk.root / "run")


@pytest.mark.parametrize("override,fragments", [
    ("--data.path={missing}", ("data.path=", "does not exist")),
    ("--train.resume={missing}", ("train.resume=", "does not exist")),
    ("--prior.prompts={missing}", ("prior.prompts=", "no such file")),
    ("--model.base={missing}", ("model.base=", "does not exist")),
])
def test_train_missing_path_is_named_before_anything_loads(tmp_path, data, capsys, monkeypatch, override, fragments):
    from amused_tune.train import loop

    monkeypatch.setattr(loop, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    missing = tmp_path / "does-not-exist"
    run([recipe_file(tmp_path, data, tmp_path / "run"), override.format(missing=missing)], 2)
    one_line(capsys, 2, str(missing), *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------- sample, merge


def sample_argv(out: Path) -> list:
    return ["sample", "--base", "tiny", "--prompt", "a cat", "--num-images", "2", "--steps", "2", "--out", out]


def test_sample_full_disk_leaves_no_half_image_and_the_rerun_writes_them(disk, capsys):
    out = disk.root / "samples"
    disk.fill()
    run(sample_argv(out), WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "disk full while writing a sampled image to", "000-seed0.png", "free space",
             "or pass another --out", prefix="amused-tune sample")
    assert not list(out.glob("*.png")) and leftovers(disk.root) == []
    disk.free()
    run(sample_argv(out), 0)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000-seed0.png", "001-seed1.png", "grid.png"]
    for name in names:
        with Image.open(out / name) as img:
            img.load()  # whole PNGs


def test_sample_read_only_out_is_said_before_loading(disk, capsys, monkeypatch):
    from amused_tune.model import bases

    monkeypatch.setattr(bases, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    disk.read_only()
    run(sample_argv(disk.root / "samples"), 2)
    one_line(capsys, 2, "--out", "is not writable", "read-only", prefix="amused-tune sample")


@pytest.mark.parametrize("flag", ["--adapter", "--image"])
def test_sample_missing_path_is_named_before_loading(tmp_path, capsys, monkeypatch, flag):
    from amused_tune.model import bases

    monkeypatch.setattr(bases, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # `runs/does-not-exist`: a typo of a run folder, not a Hub id
    argv = ["sample", "--prompt", "x", flag, "runs/does-not-exist", "--out", tmp_path / "s"]
    run(argv, 2)
    one_line(capsys, 2, "runs/does-not-exist", "does not exist" if flag == "--adapter" else "no such file",
             prefix="amused-tune sample")


def test_merge_full_disk_leaves_no_half_folder_and_the_rerun_merges(disk, straight, capsys):
    out = disk.root / "merged"
    disk.fill(leave=64 << 10)
    run(["merge", straight, "--out", out], WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "disk full while writing the merged pipeline to", str(out), "free space")
    assert not out.exists() and leftovers(disk.root) == []
    disk.free()
    run(["merge", straight, "--out", out], 0)
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()


def test_merge_read_only_out_is_said_before_loading(disk, straight, capsys):
    disk.read_only()
    run(["merge", straight, "--out", disk.root / "merged"], 2)
    one_line(capsys, 2, "--out", "is not writable", "read-only")


def test_merge_missing_run(tmp_path, capsys):
    run(["merge", tmp_path / "no-run", "--out", tmp_path / "m"], 2)
    one_line(capsys, 2, "no-run does not exist")


# --------------------------------------------------------------------------------------------- caption


def test_caption_full_disk_keeps_what_it_wrote_and_the_rerun_skips_it(disk, captioner, capsys):  # noqa: F811
    folder = make_images(disk.root / "imgs", n=3, captions=False)
    argv = ["caption", folder, "--model", captioner, "--max-new-tokens", "3", "--batch-size", "1"]
    disk.fill(leave=(6 << 10) if disk.real else 20)  # room for one caption (a tmpfs gives each file a 4 KB page)
    run(argv, WRITE_FAILED)
    line = one_line(capsys, WRITE_FAILED, "disk full while writing a caption to", "free space",
                    "it keeps the captions already written")
    written = sorted(folder.glob("*.txt"))
    assert len(written) < 3 and leftovers(folder) == []
    assert all(t.read_text().endswith("\n") and t.read_text().strip() for t in written)  # whole captions only
    assert str(folder / f"img{len(written)}.txt") in line
    before = {t.name: t.read_text() for t in written}
    disk.free()
    run(argv, 0)
    assert f"{3 - len(written)} captions written, {len(written)} kept" in capsys.readouterr().out
    assert {t.name: t.read_text() for t in folder.glob("*.txt") if t.name in before} == before
    assert len(list(folder.glob("*.txt"))) == 3


def test_caption_read_only_folder_is_said_before_loading(disk, capsys):
    make_images(disk.root / "imgs", n=2, captions=False)
    disk.read_only()
    run(["caption", disk.root / "imgs", "--model", "/no/model/needed"], 2)
    one_line(capsys, 2, "is read-only", "copy the folder to a writable disk")


def test_caption_missing_folder(tmp_path, capsys):
    run(["caption", tmp_path / "nothing"], 2)
    one_line(capsys, 2, "nothing is not a folder of images")


# --------------------------------------------------------------------------------------------- styledrop-round2


def round2_argv(run_dir: Path, prompts: Path, out: Path) -> list:
    return ["styledrop-round2", run_dir, "--prompts", prompts, "--per-prompt", "2", "--steps", "2", "--out", out,
            "--device", "cpu"]


def test_round2_full_disk_then_the_rerun_draws_the_same_candidates(disk, straight, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat in [v] style\na dog in [v] style\n")
    run(round2_argv(straight, prompts, tmp_path / "reference"), 0)  # the same command on a disk with room
    capsys.readouterr()
    out = disk.root / "round2"
    disk.fill(leave=4 << 10)
    run(round2_argv(straight, prompts, out), WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "disk full while writing a round-2 candidate to", "free space",
             prefix="amused-tune styledrop-round2")
    assert not (out / "candidates.jsonl").exists() and leftovers(disk.root) == []
    for png in out.glob("*.png"):
        assert png.read_bytes() == (tmp_path / "reference" / png.name).read_bytes()  # whole, or not there
    disk.free()
    run(round2_argv(straight, prompts, out), 0)
    expected = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected and len(expected) == 5
    assert all((out / n).read_bytes() == (tmp_path / "reference" / n).read_bytes() for n in expected)


def test_round2_read_only_out_is_said_before_loading(disk, straight, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat in [v] style\n")
    disk.read_only()
    run(round2_argv(straight, prompts, disk.root / "round2"), 2)
    one_line(capsys, 2, "--out", "is not writable", "read-only", prefix="amused-tune styledrop-round2")


def test_round2_missing_run(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    run(round2_argv(tmp_path / "no-run", tmp_path / "p.txt", tmp_path / "o"), 2)
    one_line(capsys, 2, "no-run does not exist", prefix="amused-tune styledrop-round2")


# --------------------------------------------------------------------------------------------- push


@pytest.mark.skipif(not can_mount(), reason="the push runs in its own process: needs a real mount")
def test_push_of_a_run_on_a_full_or_read_only_disk_pushes_and_keeps_the_old_card(disk, straight, tmp_path):
    """The push stages nothing in the run folder; only its local card is refreshed after the upload. On a full or
    read-only disk that refresh fails: one warning line, the old card intact, the push done (exit 0)."""
    from helpers import TOKEN, FakeHub, push

    hub = FakeHub({TOKEN: "alice"}).start()
    try:
        run_dir = Path(shutil.copytree(straight, disk.root / "run"))
        card = (run_dir / "README.md").read_bytes()
        for fault, repo in (("full", "alice/full"), ("read-only", "alice/ro")):
            disk.fill() if fault == "full" else disk.read_only()
            result = push(run_dir, "--repo-id", repo, endpoint=hub.endpoint, home=tmp_path / "hf-home")
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and lines[0].startswith("warning: pushed, but the local README.md was not updated")
            assert ("disk full" if fault == "full" else "read-only file system") in lines[0]
            assert (run_dir / "README.md").read_bytes() == card and leftovers(run_dir) == []
            assert "README.md" in hub.repos[repo].files
            disk.free() if fault == "full" else disk.read_only(False)
    finally:
        hub.stop()


def test_push_missing_run(tmp_path, capsys):
    run(["push", tmp_path / "no-run", "--repo-id", "alice/x", "--dry-run"], 2)
    one_line(capsys, 2, "no-run is not a folder")


# --------------------------------------------------------------------------------------------- toy eval


def toy_eval(argv: list, capsys) -> int:
    from amused_tune.toy.__main__ import main as toy_main

    rc = toy_main([str(a) for a in argv])
    return rc


def test_toy_eval_full_disk_and_read_only_then_the_rerun_writes_eval_json(disk, straight, tmp_path, capsys,
                                                                         monkeypatch):
    """`eval --adapter RUN` writes RUN/eval.json. Its measuring (minutes on the toy) is replaced by fixed numbers
    here; the base is a tiny pipeline folder, so that the tiny run's adapter fits."""
    from amused_tune.model.bases import build_tiny
    from amused_tune.toy import finetune_eval

    pipeline = tmp_path / "tiny-pipeline"
    build_tiny().save_pretrained(pipeline)
    numbers = {"world": 0.5, "concept": 0.25, "style_with": 0.75, "style_match": 0.5, "style_without": 0.0}
    monkeypatch.setattr(finetune_eval, "finetune_numbers", lambda *a, **k: dict(numbers))
    run_dir = Path(shutil.copytree(straight, disk.root / "run"))
    argv = ["eval", "--dir", pipeline, "--adapter", run_dir]
    for fault in ("full", "read-only"):
        disk.fill() if fault == "full" else disk.read_only()
        assert toy_eval(argv, capsys) == WRITE_FAILED
        one_line(capsys, WRITE_FAILED, "disk full" if fault == "full" else "read-only file system",
                 "while writing the evaluation to", "eval.json", prefix="python -m amused_tune.toy")
        assert not (run_dir / "eval.json").exists() and leftovers(run_dir) == []
        disk.free() if fault == "full" else disk.read_only(False)
    assert toy_eval(argv, capsys) == 0
    assert json.loads((run_dir / "eval.json").read_text())["adapter"] == numbers


def test_toy_eval_missing_adapter(tmp_path, capsys):
    assert toy_eval(["eval", "--adapter", tmp_path / "no-run"], capsys) == 2
    one_line(capsys, 2, "no-run does not exist", prefix="python -m amused_tune.toy")


def test_push_full_disk_in_the_hub_librarys_own_files_is_not_called_a_network_error(tmp_path):
    """huggingface_hub writes under HF_HOME (its cache); a full disk there is said as one, not as 'cannot reach'."""
    from amused_tune.share.hub import _describe

    line = _describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "hf" / "xet" / "chunk")),
                     "alice/x", tmp_path / "run")
    assert line.startswith(f"disk full while writing the Hub library's local files to {tmp_path / 'hf'}")
    assert "point HF_HOME at another disk" in line and "unchanged" in line and "cannot reach" not in line


# --------------------------------------------------------------------------------------------- recipes cp


def test_recipes_cp_full_disk_leaves_no_half_recipe(disk, capsys):
    target = disk.root / "my.yaml"
    disk.fill()
    run(["recipes", "cp", "quickstart", target], WRITE_FAILED)
    one_line(capsys, WRITE_FAILED, "disk full while writing the recipe to", "my.yaml", prefix="amused-tune recipes")
    assert not target.exists() and leftovers(disk.root) == []
    disk.free()
    run(["recipes", "cp", "quickstart", target], 0)
    assert yaml.safe_load(target.read_text())["model"]


@pytest.mark.parametrize("command", ["sample", "merge"])
def test_a_missing_base_folder_is_named_before_loading(tmp_path, straight, capsys, monkeypatch, command):
    from amused_tune.model import bases

    monkeypatch.setattr(bases, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    base = tmp_path / "no-base"
    if command == "sample":
        argv, prefix = ["sample", "--prompt", "x", "--base", base, "--out", tmp_path / "s"], "amused-tune sample"
    else:
        argv, prefix = ["merge", straight, "--base", base, "--out", tmp_path / "m"], "amused-tune"
    run(argv, 2)
    one_line(capsys, 2, f"--base='{base}' does not exist", prefix=prefix)
