"""Does a single-image StyleDrop recipe learn the *style*, whatever the image? ``python -m amused_tune.toy eval
--styledrop [--recipe FILE]``.

The recipe (default: the quickstart) is trained once per style image of `world.STYLE_IMAGES` (every shape; dark,
light and saturated backgrounds; each with the grey frame of the ``[v] style``), each run on its one image and
caption. Each adapter then samples world prompts that are *not* its image's content, with and without
" in [v] style", at the toy's sampling defaults, and the exact classifier reads them:

- ``style_with``: share of ``[v]`` samples showing the frame;
- ``style_match``: share of ``[v]`` samples showing the frame *and* the caption's shape, colour and background;
- ``leak``: share of samples without ``[v]`` that show the frame;
- ``caption_kept``: caption match without ``[v]``, divided by the base's on the same prompts and seeds;
- ``clean``: share of ``[v]`` samples that are cell for cell a world image (no stray cell).

A method generalizes when the *minimum over the images* of each number meets its target (`TARGETS`); the command
prints every image's numbers and the minimum, and writes them to a JSON file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from amused_tune.recipe import Recipe
from amused_tune.writes import write_file
from amused_tune.toy import world
from amused_tune.toy.classify import classify, is_clean
from amused_tune.toy.evaluate import _sampler_kwargs, eval_prompts, match_rate

DEFAULT_RECIPE = "recipes/quickstart.yaml"
KEYS = ("style_with", "style_match", "leak", "caption_kept", "clean")
# (key, ">=" or "<=", bound): the acceptance of a single-image method, on the minimum (maximum for leak) over images
TARGETS = (("style_with", ">=", 0.90), ("style_match", ">=", 0.80), ("leak", "<=", 0.05),
           ("caption_kept", ">=", 0.95), ("clean", ">=", 0.80))


def new_content_prompts(spec: world.ShapeSpec, n: int = 30) -> list[str]:
    """`n` world captions (a fixed choice) other than the style image's own content."""
    own = world.caption(world.ShapeSpec(spec.shape, spec.colour, spec.background))
    return [p for p in eval_prompts(n + 1, seed=7) if p != own][:n]


def toy_picker(images, prompts: list[str], reference=None) -> list[bool]:
    """StyleDrop round 2's automatic feedback on the toy: keep a candidate when it shows the style and its
    caption's shape, colour and background, without a stray cell (`amused-tune styledrop-round2 RUN --pick toy`)."""
    found = [classify(image) for image in images]
    return [f.style and f.matches(p) and is_clean(image, f) for image, f, p in zip(images, found, prompts)]


def load_recipe(path: str | Path, **overrides: object) -> Recipe:
    """A recipe YAML as a `Recipe`, with `overrides` ("section.key": value) set on top; raises ValueError."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    sections = {f.name: f.default_factory() for f in fields(Recipe)}
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"{path}: unknown recipe section {name!r}; known: {', '.join(sections)}")
        for key, value in (values or {}).items():
            _set(sections[name], f"{name}.{key}", value)
    recipe = Recipe(**sections)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        _set(getattr(recipe, section), dotted, value)
    return recipe.resolve().validate()


def _set(section: object, dotted: str, value: object) -> None:
    key = dotted.split(".", 1)[1]
    if not hasattr(section, key):
        raise ValueError(f"unknown recipe key {dotted!r}")
    setattr(section, key, value)


RUN_OVERRIDES = {"output.overwrite": True, "output.loss_plot": False, "validation.prompts": [], "train.resume": "none"}


def train_on(recipe_path: str | Path, spec: world.ShapeSpec, folder: Path, print_fn=print,
             base: str | None = None) -> tuple[Path, Recipe]:
    """Train the recipe on the one image of `spec` (its caption as data.prompt) into `folder`/run (`base`: another
    pipeline folder than the recipe's model.base)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "style.png"
    world.render(spec).save(image)
    recipe = load_recipe(recipe_path, **RUN_OVERRIDES, **{
        "data.source": "single_image", "data.card": None, "data.path": str(image), "data.prompt": world.caption(spec),
        "data.cache_dir": str(folder / "cache"), "output.dir": str(folder / "run"),
        **({"model.base": base} if base else {})})
    return _train(recipe, print_fn), recipe


def _train(recipe: Recipe, print_fn) -> Path:
    from amused_tune.train.loop import train

    started = time.perf_counter()
    train(recipe)
    print_fn(f"  trained in {time.perf_counter() - started:.0f} s")
    return Path(recipe.output.dir)


def feedback_rounds(recipe: Recipe, run: Path, held_out: list[str], rounds: int = 2, per_prompt: int = 2,
                    print_fn=print, adapter_scales: tuple[float, ...] = (1.0,)) -> Path:
    """StyleDrop's later rounds with the classifier as the feedback. In round r (2..`rounds`) the previous round's
    adapter draws every world caption but the held-out (evaluation) ones, with " in [v] style", `per_prompt` seeds
    each (new seeds every round) at each of `adapter_scales`; `toy_picker` keeps the ones that show the style and the caption without a stray
    cell, and a fresh adapter is trained with the same recipe on everything kept so far and round 1's image.
    Returns the last round's run folder."""
    from amused_tune.styledrop.round2 import CANDIDATES, CandidateOptions, finalize, generate_candidates, pick

    prompts = [c + world.STYLE_SUFFIX for c in world.all_captions() if c not in held_out]
    root, earlier = run.parent, []
    for r in range(2, rounds + 1):
        out = root / f"round{r}"
        generate_candidates(recipe, run, out, prompts,
                            CandidateOptions(per_prompt=per_prompt, seed=10_000 * (r - 2), device="cpu",
                                             adapter_scales=adapter_scales))
        kept, total = pick(out, toy_picker)
        print_fn(f"  round {r}: the classifier kept {kept} of {total} candidates ({len(earlier)} kept before)")
        with (out / CANDIDATES).open("a") as rows:
            for path, text in earlier:
                name = f"{path.parent.name}-{path.name}"
                shutil.copyfile(path, out / name)
                rows.write(json.dumps({"file_name": name, "text": text}) + "\n")
        lines = [json.loads(line) for line in (out / CANDIDATES).read_text().splitlines() if line.strip()]
        earlier = [(out / row["file_name"], row["text"]) for row in lines
                   if (out / row["file_name"]).is_file() and not row["file_name"].startswith("reference")]
        trained = load_recipe(finalize(recipe, run, out), **RUN_OVERRIDES, **{
            "data.cache_dir": str(root / f"cache{r}"), "output.dir": str(root / f"run{r}")})
        run = _train(trained, print_fn)
    return run


@torch.no_grad()
def measure(base, tuned, prompts: list[str], settings: dict, seeds=(0, 1)) -> dict:
    """The five numbers of the module docstring for one adapter (`tuned`) against its `base`."""
    kw = _sampler_kwargs(settings)
    styled = match_rate(tuned, [p + world.STYLE_SUFFIX for p in prompts], seeds, **kw)
    plain = match_rate(tuned, prompts, seeds, **kw)
    before = match_rate(base, prompts, seeds, **kw)
    n = len(styled.found)
    return {
        "style_with": styled.style_rate,
        "style_match": sum(f.style and f.matches(p) for f, p in zip(styled.found, styled.prompts)) / n,
        "leak": plain.style_rate,
        "caption_kept": plain.rate / max(before.rate, 1e-9),
        "clean": sum(is_clean(im, f) for im, f in zip(styled.images, styled.found)) / n,
        "caption_plain": plain.rate, "caption_base": before.rate,
    }


def summarize(per_image: dict[str, dict]) -> dict:
    """The worst image's value of each number: the minimum, the maximum for `leak`."""
    return {k: (max if k == "leak" else min)(r[k] for r in per_image.values()) for k in KEYS}


def verdict(worst: dict) -> list[str]:
    lines = []
    for key, op, bound in TARGETS:
        ok = worst[key] >= bound if op == ">=" else worst[key] <= bound
        lines.append(f"{key} {worst[key]:.2f} {op} {bound:.2f}: {'met' if ok else 'NOT met'}")
    return lines


def styledrop_eval(recipe_path: str | Path = DEFAULT_RECIPE, out: str | Path | None = None, n_prompts: int = 30,
                   seeds=(0, 1), images: list[str] | None = None, workdir: str | Path | None = None,
                   rounds: int = 1, per_prompt: int = 2, base_dir: str | Path | None = None, print_fn=print,
                   adapter_scales: tuple[float, ...] = (1.0,)) -> dict:
    """Train `recipe_path` on each style image (`images`: names of `world.STYLE_IMAGES`, default all), measure each
    on `n_prompts` new-content prompts x `seeds` (`rounds` > 1: after StyleDrop's later rounds with the classifier's
    feedback, `per_prompt` candidates per caption at each of `adapter_scales`, `feedback_rounds`); print and return
    (and write to `out`) every image's numbers and the worst image's."""
    from amused_tune.model.bases import load_components
    from amused_tune.toy import toy_dir
    from amused_tune.toy.evaluate import read_sampling_defaults
    from amused_tune.toy.finetune_eval import _apply_run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder = Path(base_dir) if base_dir else toy_dir()
    settings = read_sampling_defaults(folder)
    names = images or list(world.STYLE_IMAGES)
    base = load_components(str(folder))
    per_image = {}
    with tempfile.TemporaryDirectory(prefix="styledrop-eval-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        for name in names:
            spec = world.STYLE_IMAGES[name]
            print_fn(f"{name}: {world.caption(spec)!r}")
            prompts = new_content_prompts(spec, n_prompts)
            run, recipe = train_on(recipe_path, spec, root / name, print_fn, str(base_dir) if base_dir else None)
            if rounds > 1:
                run = feedback_rounds(recipe, run, prompts, rounds, per_prompt, print_fn, adapter_scales)
            numbers = measure(base, _apply_run(base, run), prompts, settings, seeds)
            per_image[name] = numbers
            print_fn("  " + "  ".join(f"{k} {numbers[k]:.2f}" for k in KEYS))
    worst = summarize(per_image)
    print_fn("worst image: " + "  ".join(f"{k} {worst[k]:.2f}" for k in KEYS))
    for line in verdict(worst):
        print_fn("  " + line)
    result = {"recipe": str(recipe_path), "base": str(folder), "rounds": rounds, "per_prompt": per_prompt, "adapter_scales": list(adapter_scales), "prompts": n_prompts, "seeds": list(seeds), "sampling": settings,
              "images": per_image, "worst": worst}
    if out:
        write_file(out, json.dumps(result, indent=2) + "\n", "the StyleDrop evaluation")
    return result
