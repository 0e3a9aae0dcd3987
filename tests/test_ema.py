"""train.ema_decay: the EMA formula with its warm-up, pinned on a few steps; the EMA is what a run saves (the raw
weights in adapter-raw/ and in checkpoints), resumes bit-exactly, and is counted by the memory estimate."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from amused_tune.memory import estimate as memory
from amused_tune.model.adapters import read_adapter
from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.train.ema import EMA, decay_at
from amused_tune.recipe import Recipe, RecipeError, TrainConfig
from amused_tune.train import checkpoints
from conftest import make_images
from helpers import resumed_equals_straight
from helpers import recipe_for


def test_decay_warms_up_as_min_of_decay_and_1_plus_n_over_10_plus_n():
    assert [round(decay_at(0.999, n), 6) for n in (1, 2, 10, 90)] == [round(2 / 11, 6), 0.25, 0.55, 0.91]
    assert decay_at(0.5, 100) == 0.5


def test_ema_formula_on_three_steps():
    """e starts at w0 = 0; the weight is set to 1, 2, 3 after steps 1, 2, 3: e_n = d_n e_(n-1) + (1 - d_n) w_n."""
    w = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([w], ["w"], decay=0.9)
    expected, e = [], 0.0
    for n, value in enumerate([1.0, 2.0, 3.0], 1):
        with torch.no_grad():
            w.fill_(value)
        d = ema.update()
        e = d * e + (1 - d) * value
        expected.append(e)
        assert d == pytest.approx([2 / 11, 3 / 12, 4 / 13][n - 1])
        assert ema.weights[0][0].item() == pytest.approx(e, rel=1e-6)
    assert expected[-1] == pytest.approx(2.601399, abs=1e-6)
    assert ema.updates == 3


def test_swap_twice_restores_the_trained_weights_exactly():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    ema = EMA([w], ["w"], decay=0.99, device="cpu")
    trained = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    ema.update()
    trained = w.detach().clone()
    average = ema.weights[0].clone()
    with ema.swapped_in():
        assert torch.equal(w.detach(), average)
    assert torch.equal(w.detach(), trained) and torch.equal(ema.weights[0], average)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_bad_decay_is_a_one_line_error(value):
    with pytest.raises(RecipeError, match=r"train\.ema_decay must be in \[0, 1\)"):
        Recipe(train=TrainConfig(ema_decay=value)).resolve().validate()


def test_ema_keys_round_trip_through_print_config(capsys, tmp_path):
    assert cli_main(["recipes/quickstart.yaml", "--train.ema_decay=0.995", "--train.ema_device=cpu", "--print_config"]) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    recipe = parse_recipe([str(tmp_path / "r.yaml")])[0]
    assert (recipe.train.ema_decay, recipe.train.ema_device) == (0.995, "cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data"))


def ema_recipe(out, data, steps):
    return recipe_for(out, data, max_steps=steps, ema_decay=0.9, ema_device="cpu")


def test_the_ema_is_saved_and_resumes_bit_exactly(tmp_path, data):
    """4 steps straight == 2 + 2 resumed (trained weights, losses and the EMA); adapter/ holds the EMA of the last
    checkpoint, adapter-raw/ its trained weights."""
    resumed_equals_straight(tmp_path, lambda out, steps: ema_recipe(out, data, steps))
    states = []
    for run in ("straight", "resumed"):
        last = checkpoints.list_checkpoints(tmp_path / run / "checkpoints")[-1]
        states.append(torch.load(last / "state.pt", weights_only=True)["ema"])
    assert states[0]["updates"] == states[1]["updates"] == 4
    for name, value in states[0]["weights"].items():
        assert torch.equal(value, states[1]["weights"][name]), name

    out = tmp_path / "straight"
    ema, raw = states[0]["weights"], load_file(checkpoints.list_checkpoints(out / "checkpoints")[-1] / "trainable.safetensors")
    saved, _ = read_adapter(out / "adapter")
    saved_raw, _ = read_adapter(out / "adapter-raw")
    key = next(k for k in ema if "lora_A" in k)
    module_key = key.replace(".default", "")
    assert torch.equal(saved[module_key], ema[key]) and torch.equal(saved_raw[module_key], raw[key])
    assert not torch.equal(ema[key], raw[key])


def test_memory_estimate_counts_the_ema_on_the_gpu_only():
    base = parse_recipe(["recipes/nouns_256_lora_bs8x2.yaml", "--train.ema_decay=0.999"])[0]
    rows = {r.what: r.bytes for r in memory.estimate(base).rows}
    counts = memory.parameter_counts(256, base.adapter.rank, tuple(base.adapter.targets))
    assert rows["EMA weights"] == 4 * sum(counts["lora_sizes"])
    base.train.ema_device = "cpu"
    assert {r.what: r.bytes for r in memory.estimate(base).rows}["EMA weights"] == 0
