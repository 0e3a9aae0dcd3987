"""Run folders written by an earlier version of the kit still load, resume and sample, with the same results.

tests/data/run-v0 is a tiny LoRA run (base tiny, rank 2, the kit's assets/toy_concept, 2 steps, its checkpoint at
step 2) written by the kit before its data preflight, optimizer registry and Recipe.resolve existed; that version
resumed it to step 3 with the loss and gradient norm in run-v0-expected.json and sampled run-v0-sample.png from it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.train.identity import recipe_fingerprint
from amused_tune.train.outputs import read_metrics

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = json.loads((DATA / "run-v0-expected.json").read_text())


@pytest.fixture
def old_run(tmp_path) -> Path:
    return Path(shutil.copytree(DATA / "run-v0", tmp_path / "run-v0"))


def test_an_earlier_runs_recipe_loads_with_the_identity_it_was_written_with(old_run):
    recipe, _, _ = parse_recipe([str(old_run / "recipe.yaml")])
    written = re.search(r"^# fingerprint: (\w+)$", (old_run / "recipe.yaml").read_text(), re.M).group(1)
    assert recipe_fingerprint(recipe) == written
    assert (recipe.adapter.rank, recipe.optim.lr, recipe.optim.betas) == (2, 1e-3, (0.9, 0.999))


def test_an_earlier_run_resumes_from_its_checkpoint_to_the_same_next_step(old_run, capsys):
    assert cli_main([str(old_run / "recipe.yaml"), f"--output.dir={old_run}", "--train.max_steps=3"]) == 0
    assert f"resumed from {old_run / 'checkpoints' / 'step-2'} (step 2)" in capsys.readouterr().out
    metrics = read_metrics(old_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # the same loss; the gradient norm to float rounding (the step now sums the norms with foreach operations)
    assert metrics[-1]["loss"] == EXPECTED["resumed_step3"]["loss"]
    assert metrics[-1]["grad_norm"] == pytest.approx(EXPECTED["resumed_step3"]["grad_norm"], rel=1e-6)
    assert (old_run / "checkpoints" / "step-3").is_dir() and not (old_run / "checkpoints" / "step-2").exists()


def test_an_earlier_runs_adapter_samples_the_same_image(old_run, tmp_path):
    want = EXPECTED["sample"]
    assert cli_main(["sample", "--adapter", str(old_run), "--prompt", want["prompt"], "--num-images", "1",
                     "--seed", str(want["seed"]), "--out", str(tmp_path / "sampled")]) == 0
    drawn = np.asarray(Image.open(tmp_path / "sampled" / "000-seed0.png").convert("RGB"))
    written = np.asarray(Image.open(DATA / want["file"]).convert("RGB"))
    assert drawn.shape == written.shape == (32, 32, 3) and np.array_equal(drawn, written)
