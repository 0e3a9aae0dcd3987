"""StyleDrop (issue 4): the Table 4 recipes, running them on the tiny model, and round 2 with human feedback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from amused_tune.cli import main as cli_main
from amused_tune.cli.args import parse_recipe
from amused_tune.cli.styledrop_round2 import main as round2_main
from conftest import reset_accelerate

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,base,alpha,lr,memory", [
    ("styledrop_256", "amused/amused-256", 32.0, 4.0e-4, "6.5 GB"),
    ("styledrop_512", "amused/amused-512", 1.0, 1.0e-3, "5.6 GB"),
])
def test_recipes_follow_table_4(name, base, alpha, lr, memory):
    path = REPO / "recipes" / f"{name}.yaml"
    recipe, _, _ = parse_recipe([str(path)])
    assert recipe.model.base == base and recipe.model.resolution is None
    assert (recipe.adapter.kind, recipe.adapter.rank, recipe.adapter.alpha) == ("lora", 16, alpha)
    assert recipe.adapter.targets == ["to_q", "to_k", "to_v"]
    assert recipe.optim.lr == lr and recipe.train.batch_size == 1 and recipe.train.grad_accum == 1
    assert recipe.train.max_steps == 1500 and recipe.data.card == "styledrop"
    assert all(p.endswith("in [V] style") for p in recipe.validation.prompts) and recipe.validation.prompts
    header = path.read_text().split("\nmodel:")[0]
    assert memory in header and "datasets_cards/styledrop.yaml" in header and f"amused-tune recipes/{name}.yaml" in header
    image = Image.open(REPO / "assets" / "styledrop" / "mushroom.png")
    assert min(image.size) >= 512  # no upscaling at either resolution


@pytest.fixture(scope="module")
def round1(tmp_path_factory):
    """`amused-tune recipes/styledrop_256.yaml --model.base=tiny --train.max_steps=5 --styledrop.rounds=1` (round 1
    only: the recipe's CLIP picker is not there offline), from another directory."""
    tmp = tmp_path_factory.mktemp("styledrop")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the card's image path resolves from the kit's folder
        mp.setenv("AMUSED_TUNE_CACHE", str(tmp / "cache"))
        code = cli_main([str(REPO / "recipes" / "styledrop_256.yaml"), "--model.base=tiny", "--train.max_steps=5",
                         "--validation.steps=2", "--styledrop.rounds=1"])
        yield code, tmp / "runs" / "styledrop_256"


def test_styledrop_256_runs_offline_on_the_tiny_model(round1):
    code, run = round1
    assert code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 5
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "data_report.json").read_text())["used"] == 1


def test_round2_candidates_pick_dataset_and_recipe(round1, tmp_path, capsys, monkeypatch):
    _, run = round1
    monkeypatch.setenv("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# style probes\nA house in [V] style\n\nA boat in [V] style\n")
    out = tmp_path / "round2"
    args = [str(run), "--prompts", str(prompts), "--per-prompt", "2", "--steps", "2", "--out", str(out)]
    assert round2_main(args) == 0
    assert capsys.readouterr().out.startswith(f"4 candidates and the style image (reference.png) in {out}\n")
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A house in [V] style"] * 2 + ["A boat in [V] style"] * 2 + [
        "A mushroom in [V] style"]
    first = Image.open(out / rows[0]["file_name"])
    assert first.size == (32, 32) and first.text["prompt"] == "A house in [V] style"
    assert round2_main(args) == 2  # candidates exist: no silent overwrite

    (out / rows[1]["file_name"]).unlink()  # the person deletes a miss
    assert round2_main([str(run), "--finalize", "--out", str(out)]) == 0
    kept = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [k["file_name"] for k in kept] == [r["file_name"] for r in rows if r is not rows[1]]
    recipe_path = out / "round2.yaml"
    assert f"amused-tune {recipe_path}" in capsys.readouterr().out
    written = yaml.safe_load(recipe_path.read_text())
    assert written["data"]["source"] == "imagefolder" and written["data"]["path"] == str(out.resolve())
    assert written["adapter"]["alpha"] == 32.0 and written["output"]["dir"].endswith("styledrop_256-round2")

    round2_run = tmp_path / "round2_run"
    code = cli_main([str(recipe_path), "--train.max_steps=1", f"--output.dir={round2_run}", "--validation.prompts=[]"])
    assert code == 0
    assert json.loads((round2_run / "data_report.json").read_text())["used"] == 4


def test_round2_candidates_at_several_adapter_strengths(round1, tmp_path, monkeypatch):
    """--adapter-scales 1 2: --per-prompt candidates at each strength, new seeds for each, the strength recorded; at
    scale 2 the adapter's change to the base's logits is twice what it trained to (so the images differ)."""
    _, run = round1
    monkeypatch.setenv("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A house in [V] style\n")
    out = tmp_path / "round2"
    assert round2_main([str(run), "--prompts", str(prompts), "--per-prompt", "2", "--steps", "2", "--out", str(out),
                        "--adapter-scales", "1", "2", "--no-reference"]) == 0
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["adapter_scale"]) for r in rows] == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]
    assert [r["file_name"].rsplit("-", 1)[1] for r in rows] == ["x1.png", "x1.png", "x2.png", "x2.png"]
    assert Image.open(out / rows[2]["file_name"]).text["adapter_scale"] == "2.0"

    from amused_tune.styledrop.round2 import CandidateOptions, generate_candidates

    recipe = parse_recipe([str(run / "recipe.yaml")])[0]
    one = [Image.open(out / rows[0]["file_name"])]
    for scale, same in ((1.0, True), (2.0, False)):
        again = tmp_path / f"again-{scale:g}"
        generate_candidates(recipe, run, again, ["A house in [V] style"], CandidateOptions(
            per_prompt=1, steps=2, reference=False, device="cpu", adapter_scales=(scale,)))
        image = Image.open(next(again.glob("*.png")))
        assert (list(image.getdata()) == list(one[0].getdata())) == same, scale


def test_round2_errors_are_one_line(tmp_path, capsys):
    assert round2_main([str(tmp_path), "--prompts", "p.txt"]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
    assert round2_main([str(tmp_path)]) == 2
    assert "--prompts" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- prior preservation


def _prior_recipe(out: Path, data: Path, steps: int, weight: float = 0.5):
    from helpers import recipe_for

    from amused_tune.recipe import PriorConfig

    recipe = recipe_for(out, data, max_steps=steps)
    recipe.prior = PriorConfig(prompts=["a cat", "a red house"], images_per_prompt=2, weight=weight, seed=3)
    return recipe


def test_prior_images_are_the_bases_own_cached_with_the_run_and_resume_bit_exactly(tmp_path):
    """The base (no adapter) draws prior.images_per_prompt images per prompt with the kit's sampler at its sampling
    defaults, as tokens in OUTPUT_DIR/prior/; 4 steps straight == 2 + 2 resumed, and the resumed run reuses the
    cached images instead of drawing them again."""
    from conftest import make_images, reset_accelerate
    from safetensors.torch import load_file
    from helpers import assert_same_run

    from amused_tune.model.bases import build_tiny
    from amused_tune.sampling.sampler import generate
    from amused_tune.model.sampling_defaults import resolve_sampling
    from amused_tune.train.loop import train

    data = make_images(tmp_path / "data")
    train(_prior_recipe(tmp_path / "straight", data, 4))
    reset_accelerate()
    train(_prior_recipe(tmp_path / "resumed", data, 2))
    reset_accelerate()
    cached = tmp_path / "resumed" / "prior" / "prior.safetensors"
    drawn_at = cached.stat().st_mtime_ns
    train(_prior_recipe(tmp_path / "resumed", data, 4))
    reset_accelerate()
    assert cached.stat().st_mtime_ns == drawn_at  # reused, not drawn again
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")

    stored = load_file(cached)
    prompts = ["a cat", "a cat", "a red house", "a red house"]
    sampling, _ = resolve_sampling("tiny")
    expected, _ = generate(build_tiny(), prompts, [3, 4, 5, 6], **sampling)
    assert stored["tokens"].shape == expected.shape == (4, 8, 8)
    assert torch.equal(stored["tokens"], expected)
    info = json.loads((cached.parent / "prior.json").read_text())
    assert info["prompts"] == ["a cat", "a red house"] and info["images_per_prompt"] == 2


def test_prior_loss_is_the_training_loss_plus_weight_times_the_prior_images_loss():
    from amused_tune.model.bases import build_tiny, encode_prompts, micro_conditioning
    from amused_tune.train.step import Conditioning, compute_loss

    comps = build_tiny()
    recipe = _prior_recipe(Path("unused"), Path("unused"), 1, weight=0.25)
    recipe.train.cond_dropout = 0.0

    def batch(prompts, seed):
        hidden, pooled = encode_prompts(comps.text_encoder, comps.tokenizer, prompts)
        tokens = torch.randint(0, 64, (len(prompts), 8, 8), generator=torch.Generator().manual_seed(seed))
        return {"tokens": tokens, "hidden": hidden, "pooled": pooled, "prompt": prompts,
                "micro_conds": micro_conditioning(32, 32).expand(len(prompts), -1)}

    empty = Conditioning(*encode_prompts(comps.text_encoder, comps.tokenizer, [""]))
    style, prior = batch(["a b in [v] style"] * 2, 0), batch(["a cat", "a dog"], 1)

    def gens():
        return {"mask": torch.Generator().manual_seed(7), "dropout": torch.Generator().manual_seed(8)}

    with torch.no_grad():
        both = compute_loss({**style, "prior": prior}, comps.transformer, comps, empty, recipe, gens(), "cpu")
        g = gens()
        alone = compute_loss(style, comps.transformer, comps, empty, recipe, g, "cpu")
        prior_loss = compute_loss(prior, comps.transformer, comps, empty, recipe, g, "cpu")
    assert torch.allclose(both, alone + 0.25 * prior_loss)
    assert prior_loss > 0


@pytest.mark.parametrize("override,message", [
    ("--prior.weight=-1", "prior.weight >= 0"),
    ("--prior.images_per_prompt=0", "prior.images_per_prompt must be >= 1"),
])
def test_bad_prior_values_are_one_line_errors(override, message):
    from amused_tune.recipe import RecipeError

    with pytest.raises(RecipeError, match=message):
        parse_recipe([str(REPO / "recipes" / "quickstart.yaml"), override])


def test_prior_prompts_from_a_file_and_a_missing_file(tmp_path):
    from amused_tune.data.prior import prior_prompts
    from amused_tune.recipe import RecipeError

    (tmp_path / "p.txt").write_text("# a comment\na cat\n\na dog\n")
    assert prior_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert prior_prompts(["a cat", " "]) == ["a cat"]
    with pytest.raises(RecipeError, match="no such file"):
        prior_prompts(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------------------------------------- automatic feedback


def _tiny_clip(folder: Path) -> Path:
    """A random CLIP (text and vision towers) with the tiny model's tokenizer, saved as a model folder."""
    from transformers import CLIPConfig, CLIPModel

    from amused_tune.model.bases import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=77)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_clip_picker_scores_content_and_style_and_keeps_the_good_at_both(tmp_path):
    from amused_tune.styledrop.clip_picker import ClipPicker

    picker = ClipPicker.load(str(_tiny_clip(tmp_path / "clip")))
    reference = Image.new("RGB", (32, 32), (200, 30, 30))
    images = [reference.copy(), Image.new("RGB", (32, 32), (20, 200, 30)), Image.effect_noise((32, 32), 60).convert("RGB"),
              Image.new("RGB", (32, 32), (30, 30, 200))]
    keep = picker(images, ["a cat in [V] style"] * 4, reference)
    assert len(keep) == 4 and 1 <= sum(keep) <= 4
    content, style = zip(*picker.scores)
    assert style[0] == pytest.approx(1.0, abs=1e-5) and max(style) == style[0]  # the reference itself: style 1
    assert len(set(content)) == len(set(style)) > 1
    # the style words are left out of the content score's text
    assert torch.allclose(picker.text_embeds(["a cat in [V] style"]), picker.text_embeds(["a cat"]))


def test_round2_with_the_clip_picker_picks_and_finalizes_in_one_command(round1, tmp_path, capsys, monkeypatch):
    _, run = round1
    monkeypatch.setenv("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A house in [V] style\nA boat in [V] style\n")
    out = tmp_path / "round2"
    clip = _tiny_clip(tmp_path / "clip")
    assert round2_main([str(run), "--prompts", str(prompts), "--per-prompt", "2", "--steps", "2", "--out", str(out),
                        "--pick", "clip", "--clip-model", str(clip)]) == 0
    printed = capsys.readouterr().out
    assert "clip picker kept" in printed and f"amused-tune {out / 'round2.yaml'}" in printed
    kept = [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert "reference.png" in kept and 2 <= len(kept) <= 5
    assert sorted(p.name for p in out.glob("*.png")) == sorted(kept)
    assert round2_main([str(run), "--prompts", str(prompts), "--pick", "clip"]) == 2
    assert "--clip-model" in capsys.readouterr().err


def test_toy_picker_keeps_style_and_caption_without_stray_cells_only():
    from amused_tune.toy import world
    from amused_tune.toy.styledrop_eval import toy_picker

    styled = world.ShapeSpec("circle", "red", "blue", style=True)
    plain = world.ShapeSpec("circle", "red", "blue")
    prompt = world.caption(styled)
    stray = world.render(styled).copy()
    for x in range(4, 8):  # one background cell of the second ring (cell (1, 1)) painted yellow
        for y in range(4, 8):
            stray.putpixel((x, y), world.PALETTE["yellow"])
    assert toy_picker([world.render(styled), world.render(plain), world.render(styled), stray],
                      [prompt, prompt, world.caption(world.ShapeSpec("square", "red", "blue", style=True)), prompt]) == [
        True, False, False, False]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["styledrop_256"])  # styledrop_512: the same keys; ~2x longer on a CPU
def test_styledrop_recipes_train_a_step_with_prior_preservation_at_real_size(tmp_path, monkeypatch, name):
    """The shipped StyleDrop method (single image + prior preservation) on the real-size random model: the base
    draws its prior image first, then one step trains on the style image and it (one prompt here, to stay short;
    about 4 minutes on a busy 2-core machine)."""
    from safetensors.torch import load_file

    from amused_tune.model.bases import build_real_size
    from amused_tune.train.loop import train

    monkeypatch.setenv("AMUSED_TUNE_CACHE", str(tmp_path / "cache"))
    recipe, _, _ = parse_recipe([str(REPO / "recipes" / f"{name}.yaml"), "--train.max_steps=1",
                                 "--train.precision=fp32", "--model.dtype=fp32", f"--output.dir={tmp_path / 'run'}",
                                 "--validation.prompts=[]", "--prior.prompts=[A house]", "--output.loss_plot=false"])
    assert recipe.prior.weight > 0
    summary = train(recipe, components=build_real_size(int(name[-3:])))
    w = recipe.prior.weight  # loss = style + w x prior, each ~ln(8192) = 9.01 for a random model
    assert summary["step"] == 1 and (1 + w) * 8.0 < summary["loss"] < (1 + w) * 10.5
    tokens = load_file(tmp_path / "run" / "prior" / "prior.safetensors")["tokens"]
    assert tokens.shape == (recipe.prior.images_per_prompt, int(name[-3:]) // 16, int(name[-3:]) // 16)


def test_the_three_styledrop_recipes_ship_the_same_single_image_method():
    """The toy quickstart (where the method is measured) and the real-size StyleDrop recipes: one style image, prior
    preservation at weight 1 and at most half of the tokens masked per example (docs/toy.md)."""
    recipes = {name: parse_recipe([str(REPO / "recipes" / f"{name}.yaml")])[0]
               for name in ("quickstart", "styledrop_256", "styledrop_512")}
    for name, recipe in recipes.items():
        assert recipe.train.max_masking_rate == 0.5, name
        assert recipe.prior.prompts and recipe.prior.weight == 1.0, name
        assert recipe.adapter.kind == "lora" and set(recipe.adapter.targets) == {"to_q", "to_k", "to_v"}, name


# --------------------------------------------------------------------------------------------- rounds in one command

CAPTIONS = ["a red circle on a white background in [v] style", "a green square on a black background in [v] style"]


def _keep_even(images, prompts, reference=None):
    """A deterministic picker: keeps candidates 0, 2, ..."""
    return [i % 2 == 0 for i in range(len(images))]


def rounds_recipe_file(folder: Path, rounds: int = 2, pick: str = "auto") -> Path:
    """The quickstart on the toy, cut down: 2 steps a round, one prior prompt, 2 candidate prompts x 1 seed at
    strengths 1 and 1.5 (4 candidates a round, drawn 2 at a time), no validation grid."""
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["train"].update(max_steps=2, checkpoint_every=1, batch_size=2)
    raw["validation"]["prompts"] = []
    raw["prior"]["prompts"] = ["a red circle on a black background"]
    raw["data"]["cache_dir"] = str(folder / "cache")
    raw["output"] = {"dir": str(folder / "run"), "loss_plot": False}
    raw["styledrop"] = {"rounds": rounds, "prompts": CAPTIONS, "per_prompt": 1, "adapter_scales": [1, 1.5],
                        "batch_size": 2, "pick": pick}
    path = folder / "rounds.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow  # about 25 s on 2 idle cores: three rounds of training
def test_three_rounds_in_one_command_write_each_round_and_train_each_on_everything_kept(tmp_path):
    """styledrop.rounds=3: round 1 in run/round-1, round 2's candidates (drawn by round 1's adapter) and run in
    run/round-2, round 3's candidates (new seeds, by round 2's adapter) in run/round-3/candidates, and round 3, the
    result, in run itself: trained on the style image and both rounds' kept candidates, with round 1's prior."""
    from amused_tune.styledrop.rounds import run_rounds

    recipe = parse_recipe([str(rounds_recipe_file(tmp_path, rounds=3))])[0]
    summary = run_rounds(recipe, lambda _: _keep_even)
    run = tmp_path / "run"
    assert summary["output_dir"] == str(run) and summary["rounds"] == {"2": (2, 4), "3": (2, 4)}
    for folder in (run / "round-1", run / "round-2", run):
        assert (folder / "adapter" / "pytorch_lora_weights.safetensors").is_file(), folder
        assert json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    for k, seeds, drawn_by in ((2, [0, 1, 2, 3], run / "round-1"), (3, [10000, 10001, 10002, 10003], run / "round-2")):
        cands = run / f"round-{k}" / "candidates"
        rows = [json.loads(line) for line in (cands / "candidates.jsonl").read_text().splitlines()]
        assert [(r["text"], r["seed"], r["adapter_scale"]) for r in rows] == [
            (CAPTIONS[0], seeds[0], 1.0), (CAPTIONS[1], seeds[1], 1.0), (CAPTIONS[0], seeds[2], 1.5),
            (CAPTIONS[1], seeds[3], 1.5)]
        assert json.loads((cands / "picked.json").read_text()) == {r["file_name"]: i % 2 == 0 for i, r in enumerate(rows)}
        assert sorted(p.name for p in cands.glob("*.png")) == sorted([rows[0]["file_name"], rows[2]["file_name"]])
        assert Image.open(cands / rows[0]["file_name"]).text["adapter"] == str(drawn_by / "adapter")
        assert not (cands / "candidates.partial.jsonl").exists()
    final = yaml.safe_load((run / "recipe.yaml").read_text())
    assert final["styledrop"]["rounds"] == 1 and final["data"]["path"] is None
    assert [(s["source"], s["path"]) for s in final["data"]["sources"]] == [
        ("single_image", "assets/quickstart/toy_style.png"),
        ("imagefolder", str((run / "round-2" / "candidates").resolve())),
        ("imagefolder", str((run / "round-3" / "candidates").resolve()))]
    assert json.loads((run / "data_report.json").read_text())["used"] == 1 + 2 + 2
    assert (run / "prior" / "prior.safetensors").read_bytes() == (
        run / "round-1" / "prior" / "prior.safetensors").read_bytes()
    assert json.loads((run / "styledrop.json").read_text())["kept"] == {"2": [2, 4], "3": [2, 4]}

    again = run_rounds(recipe, lambda _: pytest.fail("every pick is made: no picker is loaded"))
    assert again["already_done"] and again["rounds"] == summary["rounds"]


class Killed(BaseException):
    """Stands in for a SIGKILL: nothing catches it, nothing after it runs."""


def test_a_kill_in_the_candidate_step_resumes_there_and_ends_bit_identical(tmp_path, monkeypatch):
    """Killed after the first batch of candidates (and with a half-written image and a cut progress line left
    behind), the rerun draws only the missing batch and ends with round 2's weights and losses bit-identical to a
    run never killed."""
    from amused_tune.sampling import sampler
    from amused_tune.styledrop.rounds import run_rounds
    from helpers import assert_same_run

    reference = parse_recipe([str(rounds_recipe_file(tmp_path / "ref"))])[0]
    run_rounds(reference, lambda _: _keep_even)
    reset_accelerate()

    recipe = parse_recipe([str(rounds_recipe_file(tmp_path / "killed"))])[0]
    real, calls = sampler.generate, []

    def killed_on_the_second_batch(comps, prompts, seeds, **kw):
        if any("[v]" in p for p in prompts or []):
            calls.append(list(seeds))
            if len(calls) == 2:
                raise Killed
        return real(comps, prompts, seeds, **kw)

    monkeypatch.setattr(sampler, "generate", killed_on_the_second_batch)
    with pytest.raises(Killed):
        run_rounds(recipe, lambda _: _keep_even)
    cands = tmp_path / "killed" / "run" / "round-2" / "candidates"
    assert not (cands / "candidates.jsonl").exists() and len(list(cands.glob("*.png"))) == 2
    (cands / ".002-half-written.png.tmp").write_bytes(b"\x89PNG")  # what a kill inside image.save leaves
    with (cands / "candidates.partial.jsonl").open("a") as partial:
        partial.write('{"file_name": "00')  # a line cut by the kill
    reset_accelerate()

    calls.clear()
    run_rounds(recipe, lambda _: _keep_even)
    assert calls == [[2, 3]]  # only the batch the kill cut off
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "killed" / "run")
    ref_cands = tmp_path / "ref" / "run" / "round-2" / "candidates"
    assert sorted(p.name for p in cands.glob("*.png")) == sorted(p.name for p in ref_cands.glob("*.png"))
    for image in ref_cands.glob("*.png"):
        assert Image.open(image).tobytes() == Image.open(cands / image.name).tobytes()


def test_random_style_images_are_seeded_distinct_and_never_two_colours_alike():
    from amused_tune.toy import world

    drawn = world.random_style_specs(30, seed=3)
    assert drawn == world.random_style_specs(30, seed=3) and drawn != world.random_style_specs(30, seed=4)
    assert len({(s.shape, s.colour, s.background) for s in drawn}) == 30
    for spec in drawn:
        assert spec.style and spec.colour != spec.background and spec.ring not in (spec.colour, spec.background)
        assert world.parse_caption(world.caption(spec)) == (spec.shape, spec.colour, spec.background)
    fixed = list(world.STYLE_IMAGES.values())
    assert not set(world.random_style_specs(84, seed=0, exclude=fixed)) & set(fixed)  # 90 - 6 left: all of them
    with pytest.raises(ValueError, match="only 84 style images are left"):
        world.random_style_specs(85, seed=0, exclude=fixed)


@pytest.mark.slow  # about 30 s on 2 idle cores: two runs, each measured and drawn
def test_the_eval_trains_random_images_and_pairs_and_counts_by_background(tmp_path, monkeypatch):
    """`toy eval --styledrop --images none --random 1 --pairs 1` (1 training step, 3 prompts x 1 seed): a random
    image trained alone and a random pair trained as a folder, each measured; the [v] samples by background add up
    over both; the worst one's before/after picture is written."""
    from amused_tune.toy import world
    from amused_tune.toy.__main__ import main as toy_main

    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["train"].update(max_steps=1, checkpoint_every=1, batch_size=2)
    raw["prior"]["prompts"] = ["a red circle on a black background"]
    raw["styledrop"]["rounds"] = 1
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(raw))
    out, picture = tmp_path / "eval.json", tmp_path / "worst.png"
    assert toy_main(["eval", "--styledrop", "--recipe", str(tmp_path / "short.yaml"), "--images", "none",
                     "--random", "1", "--pairs", "1", "--seed", "5", "--prompts", "3", "--seeds", "1",
                     "--workdir", str(tmp_path / "w"), "--picture", str(picture), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    one, a, b = world.random_style_specs(3, seed=5, exclude=[])
    single, pair = world.spec_name(one), f"{world.spec_name(a)}+{world.spec_name(b)}"
    assert list(result["images"]) == [single, pair]
    assert result["styles"][pair] == [world.caption(a), world.caption(b)]
    assert json.loads((tmp_path / "w" / pair / "run" / "data_report.json").read_text())["used"] == 2
    for numbers in result["images"].values():
        assert sum(n for _, _, n in numbers["by_background"].values()) == 3
    assert sum(n for _, _, n in result["by_background"].values()) == 6
    assert result["worst"]["style_match"] == min(r["style_match"] for r in result["images"].values())
    image = Image.open(picture)
    assert result["worst_image"] in (single, pair) and image.text["top"] == "the base"
    assert image.height == 2 * 256 and image.width == 256 * len(json.loads(image.text["prompts"]))


def test_the_readme_styledrop_numbers_are_the_eval_files():
    """README.md's StyleDrop block is what bench/styledrop_table.py makes of docs/styledrop_eval.json."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import styledrop_table
    from amused_tune.toy import world

    assert styledrop_table.FIXED == tuple(world.STYLE_IMAGES)
    result = json.loads((REPO / "docs" / "styledrop_eval.json").read_text())
    assert styledrop_table.block_of((REPO / "README.md").read_text()) == styledrop_table.render(result)
    assert result["recipe"] == "recipes/quickstart.yaml" and result["random"] == 12 and result["seed"] == 0
    assert len(result["styles"]) == 18 and result["complete"] == (len(result["images"]) == 18)


@pytest.mark.parametrize("override, message", [
    ("--styledrop.rounds=0", "styledrop.rounds must be >= 1"),
    ("--styledrop.adapter_scales=[0]", "styledrop.adapter_scales must be numbers > 0"),
    ("--styledrop.prompts=[]", "styledrop.rounds > 1 draws candidates for styledrop.prompts"),
    ("--adapter.kind=full", "use adapter.kind=lora"),
    ("--styledrop.pick=clip", "styledrop.pick=clip needs styledrop.clip_model"),
])
def test_bad_styledrop_values_are_one_line_errors(capsys, override, message):
    # the quickstart, which runs its feedback round (styledrop.rounds 2)
    assert cli_main([str(REPO / "recipes" / "quickstart.yaml"), override, "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_clip_model_that_is_not_there_stops_before_anything_trains(tmp_path, capsys):
    """Offline and not downloaded (here: a folder that does not exist): one line saying how to get it or how to
    train without the feedback round, before round 1 trains."""
    out = tmp_path / "run"
    code = cli_main([str(REPO / "recipes" / "styledrop_256.yaml"), "--model.base=tiny",
                     f"--styledrop.clip_model={tmp_path / 'no-clip'}", f"--output.dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "hf download" in err[0] and "styledrop.rounds=1" in err[0] and "Traceback" not in err[0]
    assert not (out / "round-1" / "adapter").exists() and not (out / "round-1" / "checkpoints").exists()


def test_the_estimate_counts_the_candidate_draw_and_keeps_both_recipes_at_3_gb():
    """With styledrop.rounds 2 the candidate draw is a moment of the run: every weight (U-ViT, LoRA, text encoder,
    VQ) back on the GPU, `styledrop.batch_size` prompts sampled with guidance, then decoded at once."""
    from amused_tune.memory import estimate as memory

    for name in ("styledrop_256", "styledrop_512"):
        recipe = parse_recipe([str(REPO / "recipes" / f"{name}.yaml")])[0]
        est = memory.estimate(recipe)
        assert est.peak_gb <= 3.0 and "styledrop candidates: VQ decode" in est.moments, name
        assert est.moments["styledrop candidates: sampling"][1].startswith(f"{recipe.styledrop.batch_size} prompts")
        one_round = memory.estimate(parse_recipe([str(REPO / "recipes" / f"{name}.yaml"), "--styledrop.rounds=1"])[0])
        assert not any(m.startswith("styledrop") for m in one_round.moments) and one_round.peak_gb <= est.peak_gb
    four = memory.estimate(parse_recipe([str(REPO / "recipes" / "styledrop_512.yaml"), "--styledrop.batch_size=4"])[0])
    assert four.peak_gb > 3.0 and four.peak_gb == pytest.approx(four.at("styledrop candidates: VQ decode") / memory.GB)


KILL_RUNNER = r'''
"""The CLI, with the candidate draw pausing (and touching RUNNER_MARKER) before its second batch."""
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from amused_tune.sampling import sampler
real, calls = sampler.generate, []
def paused(comps, prompts, seeds, **kw):
    if any("[v]" in p for p in prompts or []):
        calls.append(seeds)
        if len(calls) == 2:
            Path(os.environ["RUNNER_MARKER"]).write_text("drawing")
            time.sleep(120)
    return real(comps, prompts, seeds, **kw)
sampler.generate = paused
from amused_tune.cli import main
sys.exit(main())
'''


@pytest.mark.slow  # about 40 s on 2 idle cores: a reference run, a killed one, its resumption
def test_sigkill_in_the_candidate_step_resumes_there_to_the_same_adapter(tmp_path):
    """A real SIGKILL of `amused-tune RECIPE.yaml` while it draws round 2's candidates: rerunning the command keeps
    round 1 and the candidates already drawn, and ends with the weights and losses of a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import assert_same_run

    recipe_file = rounds_recipe_file(tmp_path, pick="all")
    assert cli_main([str(recipe_file), f"--output.dir={tmp_path / 'ref'}"]) == 0
    reset_accelerate()
    (tmp_path / "runner.py").write_text(KILL_RUNNER)
    out, marker = tmp_path / "killed", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(recipe_file), f"--output.dir={out}"],
                            env={**os.environ, "PYTHONPATH": str(REPO), "RUNNER_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    cands = out / "round-2" / "candidates"
    assert (out / "round-1" / "adapter").is_dir() and not (cands / "candidates.jsonl").exists()
    assert len(list(cands.glob("*.png"))) == 2 and not (out / "adapter").exists()
    assert cli_main([str(recipe_file), f"--output.dir={out}"]) == 0
    assert_same_run(tmp_path / "ref", out)
    assert json.loads((out / "styledrop.json").read_text())["kept"] == {"2": [4, 4]}
