"""Loading a base: the checks made once at load, before anything trains or samples."""

from __future__ import annotations

import json

import pytest

from amused_tune.cli import main as cli_main
from amused_tune.model.bases import BaseModelError, build_tiny, load_components


@pytest.fixture
def mismatched_base(tmp_path):
    """A tiny pipeline folder whose scheduler's mask_token_id (3) is not the U-ViT's vocab_size - 1 (64)."""
    folder = tmp_path / "base"
    build_tiny().save_pretrained(folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "mask_token_id": 3}))
    return folder


def test_a_consistent_base_loads_with_one_mask_id(tmp_path):
    build_tiny().save_pretrained(tmp_path / "base")
    comps = load_components(str(tmp_path / "base"))
    assert comps.mask_id == comps.transformer.config.vocab_size - 1 == 64


def test_a_base_whose_scheduler_and_transformer_disagree_on_the_mask_id_is_refused(mismatched_base):
    with pytest.raises(BaseModelError, match=r"mask_token_id=3 .* vocab_size - 1 = 64"):
        load_components(str(mismatched_base))


def test_training_on_such_a_base_is_one_line_exit_2(mismatched_base, tmp_path, capsys):
    argv = ["recipes/quickstart.yaml", f"--model.base={mismatched_base}", f"--output.dir={tmp_path / 'run'}"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask_token_id=3" in err[0] and "scheduler_config.json" in err[0]
