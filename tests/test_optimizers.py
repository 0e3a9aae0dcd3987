"""optim.name: every optimizer builds from a recipe, keeps the state the memory estimate counts, takes its usual
defaults, refuses bad values in one line, and resumes bit-exactly (CPU, tiny model)."""

from __future__ import annotations

import pytest
import torch

from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune import optimizers
from amused_tune.optimizers import state_bytes
from amused_tune.recipe import OptimConfig, Recipe, RecipeError
from amused_tune.train.loop import train
from amused_tune.train.setup import make_optimizer
from conftest import make_images
from helpers import recipe_for, resumed_equals_straight

NAMES = ["adamw", "adamw8bit", "lion8bit", "prodigy", "adafactor"]



def held_bytes(optimizer) -> tuple[int, int]:
    """(bytes of the optimizer's state tensors, how many of them are one-element counters)."""
    tensors = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(v.numel() * v.element_size() for v in tensors), sum(v.numel() == 1 for v in tensors)


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_equal_what_the_optimizer_holds_after_a_step(name):
    """A 128x64 matrix (8-bit state), a 16x8 one (under bitsandbytes' 4096 elements: fp32 state) and biases."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(8, 16))
    params = list(model.parameters())
    optimizer = make_optimizer(Recipe(optim=OptimConfig(name=name)).resolve().validate(), params)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    held, counters = held_bytes(optimizer)
    assert held - 4 * counters == state_bytes(name, [tuple(p.shape) for p in params])
    assert all(not torch.equal(a, p) for a, p in zip(before, params))  # it stepped


def test_state_sizes_order_on_a_lora_sized_matrix():
    shapes = [(16, 1024), (1024, 16)]
    sizes = {name: state_bytes(name, shapes) for name in NAMES}
    assert sizes["prodigy"] == 2 * sizes["adamw"] == 4 * 4 * 2 * 16 * 1024
    assert sizes["adafactor"] < sizes["lion8bit"] < sizes["adamw8bit"] < sizes["adamw"]


@pytest.mark.parametrize("name,lr,betas", [("adamw", 8e-4, (0.9, 0.999)), ("lion8bit", 1e-4, (0.9, 0.99)),
                                           ("prodigy", 1.0, (0.9, 0.999)), ("adafactor", 8e-4, (0.9, 0.999))])
def test_unset_lr_and_betas_take_the_optimizers_usual_values(name, lr, betas):
    o = Recipe(optim=OptimConfig(name=name)).resolve().validate().optim
    assert (o.lr, o.betas) == (lr, betas)
    assert Recipe(optim=OptimConfig(name=name, lr=3e-3)).resolve().validate().optim.lr == 3e-3


def test_adam_8bit_keeps_meaning_8bit_adamw():
    import bitsandbytes as bnb

    recipe = Recipe(optim=OptimConfig(adam_8bit=True)).resolve().validate()
    assert recipe.optim.resolved_name == "adamw8bit"
    assert isinstance(make_optimizer(recipe, [torch.nn.Parameter(torch.zeros(64, 64))]), bnb.optim.AdamW8bit)


def test_prodigy_gets_its_diffusion_settings_and_safeguards_a_warmup():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    group = make_optimizer(Recipe(optim=OptimConfig(name="prodigy")).resolve().validate(), [p]).param_groups[0]
    assert (group["lr"], group["use_bias_correction"], group["safeguard_warmup"], group["d_coef"]) == (1.0, True, False, 1.0)
    warm = Recipe(optim=OptimConfig(name="prodigy", warmup_steps=10)).resolve().validate()
    assert make_optimizer(warm, [p]).param_groups[0]["safeguard_warmup"] is True


def test_param_groups_keep_their_weight_decay():
    w, b = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8))
    groups = [{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}]
    for name in NAMES:
        opt = make_optimizer(Recipe(optim=OptimConfig(name=name, weight_decay=0.01)).resolve().validate(), groups)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0], name


@pytest.mark.parametrize("optim,key", [(dict(name="lion8bit", adam_8bit=True), "optim.adam_8bit"),
                                       (dict(name="prodigy", d_coef=0), "optim.d_coef"),
                                       (dict(betas=(0.9, 1.5)), "optim.betas")])
def test_bad_values_are_one_line_errors(optim, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        Recipe(optim=OptimConfig(**optim)).resolve().validate()


def test_bad_name_on_the_command_line(capsys):
    assert cli_main(["recipes/quickstart.yaml", "--optim.name=sgd", "--print_config"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amused-tune")]
    assert len(err) == 1 and "optim.name" in err[0] and "prodigy" in err[0]


def test_optimizer_keys_round_trip_through_print_config(capsys, tmp_path):
    argv = ["recipes/quickstart.yaml", "--optim.name=prodigy", "--optim.d_coef=2.0", "--optim.safeguard_warmup=true",
            "--optim.use_bias_correction=false", "--optim.lr=0.5"]
    assert cli_main(argv + ["--print_config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "r.yaml").write_text(printed)
    assert cli_main([str(tmp_path / "r.yaml"), "--print_config"]) == 0
    again = capsys.readouterr().out
    assert printed == again and "name: prodigy" in printed and "d_coef: 2.0" in printed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", ["prodigy", "lion8bit", "adafactor"])
def test_resume_is_bit_exact(tmp_path, data, name):
    """2 steps + 2 resumed steps == 4 steps straight, Prodigy's d estimate and 8-bit states included."""
    def recipe(out, steps):
        r = recipe_for(out, data, max_steps=steps)
        r.optim = OptimConfig(name=name, lr=None if name == "prodigy" else 2e-3)
        return r

    resumed_equals_straight(tmp_path, recipe)


def test_the_registry_is_the_one_list_the_schema_help_and_defaults_read(capsys):
    assert optimizers.NAMES == tuple(NAMES)
    assert cli_main(["quickstart", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--optim.name {" + ",".join(NAMES) + "}" in text
    for entry in optimizers.REGISTRY.values():
        assert f"{entry.name} ({' '.join(entry.help.split())}; lr {entry.lr:g})" in text
        o = Recipe(optim=OptimConfig(name=entry.name)).resolve().validate().optim
        assert (o.lr, o.betas) == (entry.lr, entry.betas)
    with pytest.raises(Exception, match="optim.name must be one of 'adamw', 'adamw8bit', 'lion8bit', 'prodigy', "
                                        "'adafactor'"):
        parse_recipe(["quickstart", "--optim.name=lion"])
