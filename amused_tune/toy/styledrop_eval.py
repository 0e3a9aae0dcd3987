"""Does a StyleDrop recipe learn the *style*, whatever the image? ``python -m amused_tune.toy eval --styledrop
[--recipe FILE] [--random N --seed S] [--pairs N]``.

The recipe (default: the quickstart) is trained as `amused-tune RECIPE.yaml` trains it (every round of
`styledrop.rounds`, the toy's classifier picking the candidates) once per style image: the fixed ones of
`world.STYLE_IMAGES` (every shape; dark, light and saturated backgrounds; each with the grey frame of the
``[v] style``), `--random N` images nobody chose (`world.random_style_specs`), or `--pairs N` random pairs trained
together as a folder. Each adapter then samples world prompts that are *not* its images' content, with and without
" in [v] style", at the toy's sampling defaults, and the exact classifier reads them:

- ``style_with``: share of ``[v]`` samples showing the frame;
- ``style_match``: share of ``[v]`` samples showing the frame *and* the caption's shape, colour and background;
- ``leak``: share of samples without ``[v]`` that show the frame;
- ``caption_kept``: caption match without ``[v]``, divided by the base's on the same prompts and seeds;
- ``clean``: share of ``[v]`` samples that are cell for cell a world image (no stray cell).

Later rounds draw their candidates for the world captions that are not evaluation prompts (never for what is
measured). A method generalizes when the *minimum over the images* of each number meets its target (`TARGETS`); the
command prints every image's numbers, the minimum and the ``[v]`` samples by the prompt's background colour, and
writes them all to a JSON file.
"""

from __future__ import annotations

import json
import os
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


def new_content_prompts(specs: list[world.ShapeSpec], n: int = 30) -> list[str]:
    """`n` world captions (a fixed choice) other than the style images' own content."""
    own = {world.caption(world.ShapeSpec(s.shape, s.colour, s.background)) for s in specs}
    return [p for p in eval_prompts(n + len(own), seed=7) if p not in own][:n]


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


# a workdir run of the same recipe resumes (a finished one is only measured again); another recipe's is discarded
RUN_OVERRIDES = {"output.overwrite": True, "output.loss_plot": False, "validation.prompts": [], "train.resume": "auto"}


def train_on(recipe_path: str | Path, specs: list[world.ShapeSpec], folder: Path, held_out: list[str],
             print_fn=print, base: str | None = None, **overrides) -> Path:
    """Train the recipe, every round of it, on the style image(s) `specs` (one: data.source single_image with its
    caption; several: an imagefolder) into `folder`/run; later rounds draw candidates for every world caption in
    ``[v] style`` but `held_out`. `base`: another pipeline folder than the recipe's model.base; `overrides`
    ("section.key": value) go on top. Returns the run folder (its last round)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(specs) == 1:
        image = folder / "style.png"
        world.render(specs[0]).save(image)
        data = {"data.source": "single_image", "data.path": str(image), "data.prompt": world.caption(specs[0])}
    else:
        data = {"data.source": "imagefolder", "data.path": str(world.write_imagefolder(folder / "style", specs)),
                "data.prompt": None, "data.caption_column": "text"}
    candidates = [c + world.STYLE_SUFFIX for c in world.all_captions() if c not in held_out]
    recipe = load_recipe(recipe_path, **RUN_OVERRIDES, **{
        "data.card": None, **data, "data.cache_dir": str(folder / "cache"), "output.dir": str(folder / "run"),
        "styledrop.prompts": candidates, **({"model.base": base} if base else {}), **overrides})
    started = time.perf_counter()
    if recipe.styledrop.rounds > 1:
        from amused_tune.styledrop.rounds import run_rounds

        summary = run_rounds(recipe, lambda _: toy_picker, print_fn=lambda line: print_fn("  " + line))
        print_fn(f"  kept by round: {summary['rounds']}")
    else:
        from amused_tune.train.loop import train

        train(recipe)
    print_fn(f"  trained in {time.perf_counter() - started:.0f} s")
    return Path(recipe.output.dir)


@torch.no_grad()
def measure(base, tuned, prompts: list[str], settings: dict, seeds=(0, 1)) -> dict:
    """The five numbers of the module docstring for one adapter (`tuned`) against its `base`, and the ``[v]``
    samples by the prompt's background colour ("by_background": {colour: [frame drawn, frame and caption, n]})."""
    kw = _sampler_kwargs(settings)
    styled = match_rate(tuned, [p + world.STYLE_SUFFIX for p in prompts], seeds, **kw)
    plain = match_rate(tuned, prompts, seeds, **kw)
    before = match_rate(base, prompts, seeds, **kw)
    n = len(styled.found)
    by_background: dict[str, list[int]] = {}
    for f, p in zip(styled.found, styled.prompts):
        counts = by_background.setdefault(world.parse_caption(p)[2], [0, 0, 0])
        counts[0] += f.style
        counts[1] += f.style and f.matches(p)
        counts[2] += 1
    return {
        "style_with": styled.style_rate,
        "style_match": sum(f.style and f.matches(p) for f, p in zip(styled.found, styled.prompts)) / n,
        "leak": plain.style_rate,
        "caption_kept": plain.rate / max(before.rate, 1e-9),
        "clean": sum(is_clean(im, f) for im, f in zip(styled.images, styled.found)) / n,
        "caption_plain": plain.rate, "caption_base": before.rate,
        "by_background": dict(sorted(by_background.items())),
    }


def background_totals(per_image: dict[str, dict]) -> dict[str, list[int]]:
    """Every image's `by_background` added up: {colour: [frame drawn, frame and caption, n]}."""
    totals: dict[str, list[int]] = {}
    for numbers in per_image.values():
        for colour, counts in numbers["by_background"].items():
            totals[colour] = [a + b for a, b in zip(totals.get(colour, [0, 0, 0]), counts)]
    return dict(sorted(totals.items()))


def background_lines(totals: dict[str, list[int]]) -> list[str]:
    """The by-background table as lines: frame and frame + caption per background colour over all images."""
    lines = ["[v] samples by background: frame drawn / frame and caption, of n"]
    for colour, (frame, match, n) in totals.items():
        lines.append(f"  {colour:<7} {frame:>4} / {match:>4} of {n:<4} ({frame / n:.2f} / {match / n:.2f})")
    return lines


def summarize(per_image: dict[str, dict]) -> dict:
    """The worst image's value of each number: the minimum, the maximum for `leak`."""
    return {k: (max if k == "leak" else min)(r[k] for r in per_image.values()) for k in KEYS}


def verdict(worst: dict) -> list[str]:
    lines = []
    for key, op, bound in TARGETS:
        ok = worst[key] >= bound if op == ">=" else worst[key] <= bound
        lines.append(f"{key} {worst[key]:.2f} {op} {bound:.2f}: {'met' if ok else 'NOT met'}")
    return lines


@torch.no_grad()
def before_after(base, tuned, prompts: list[str], settings: dict, path: Path, title: str) -> Path:
    """A picture of one adapter: the first ``[v]`` prompt on each background colour drawn by the base (top row)
    and by the adapter (bottom row), seed 0, labelled; `title` (the style image) goes in its text chunks."""
    from amused_tune.sampling.preview import viewable_tiles
    from amused_tune.sampling.sampler import generate, save_grid, to_pil

    chosen = {}
    for p in prompts:
        chosen.setdefault(world.parse_caption(p)[2], p + world.STYLE_SUFFIX)
    shown = [chosen[c] for c in sorted(chosen)]
    rows = []
    for comps in (base, tuned):
        _, images = generate(comps, shown, [0] * len(shown), **_sampler_kwargs(settings))
        rows += viewable_tiles(to_pil(images), shown)
    return save_grid(rows, path, {"style image": title, "top": "the base", "bottom": "the adapter",
                                  "prompts": shown}, nrow=len(shown))


def worst_name(per_image: dict[str, dict]) -> str:
    """The style image set with the lowest frame + caption share (then the lowest frame share)."""
    return min(per_image, key=lambda n: (per_image[n]["style_match"], per_image[n]["style_with"]))


def style_cases(images: list[str] | None = None, random: int = 0, pairs: int = 0, seed: int = 0
                ) -> dict[str, list[world.ShapeSpec]]:
    """The style image sets to train on, by name: the fixed `images` (names of `world.STYLE_IMAGES`; None: all six,
    [] none), then `random` random images and `pairs` random pairs (`world.random_style_specs`, drawn with `seed`;
    none of them a fixed one, none twice)."""
    names = list(world.STYLE_IMAGES) if images is None else images
    unknown = [n for n in names if n not in world.STYLE_IMAGES]
    if unknown:
        raise ValueError(f"unknown style image {unknown[0]!r}; known: {', '.join(world.STYLE_IMAGES)}")
    cases = {n: [world.STYLE_IMAGES[n]] for n in names}
    drawn = world.random_style_specs(random + 2 * pairs, seed, exclude=[s for c in cases.values() for s in c])
    for spec in drawn[:random]:
        cases[world.spec_name(spec)] = [spec]
    rest = drawn[random:]
    for a, b in zip(rest[0::2], rest[1::2]):
        cases[f"{world.spec_name(a)}+{world.spec_name(b)}"] = [a, b]
    return cases


_BASES: dict[str, object] = {}  # the base's components, loaded once per process


def measure_case(recipe_path: str, name: str, specs: list[world.ShapeSpec], root: str, n_prompts: int, seeds,
                 base_dir: str | None, overrides: dict, print_fn=print) -> dict:
    """Train and measure one style image set (`styledrop_eval`'s step; runs in a worker process with jobs > 1):
    its numbers, and its `before_after` picture in ROOT/NAME/before_after.png."""
    from amused_tune.model.bases import load_components
    from amused_tune.toy import toy_dir
    from amused_tune.toy.evaluate import read_sampling_defaults
    from amused_tune.toy.finetune_eval import _apply_run

    if os.environ.get("EVAL_WORKER"):
        torch.set_num_threads(1)
    folder = Path(base_dir) if base_dir else toy_dir()
    base = _BASES.setdefault(str(folder), load_components(str(folder)))
    settings = read_sampling_defaults(folder)
    print_fn(f"{name}: " + " + ".join(repr(world.caption(s)) for s in specs))
    prompts = new_content_prompts(specs, n_prompts)
    run = train_on(recipe_path, specs, Path(root) / name, prompts, print_fn, base_dir, **overrides)
    tuned = _apply_run(base, run)
    numbers = measure(base, tuned, prompts, settings, seeds)
    print_fn(f"{name}:  " + "  ".join(f"{k} {numbers[k]:.2f}" for k in KEYS))
    before_after(base, tuned, prompts, settings, Path(root) / name / "before_after.png",
                 " + ".join(map(world.caption, specs)))
    return numbers


def styledrop_eval(recipe_path: str | Path = DEFAULT_RECIPE, out: str | Path | None = None, n_prompts: int = 30,
                   seeds=(0, 1), images: list[str] | None = None, workdir: str | Path | None = None,
                   base_dir: str | Path | None = None, print_fn=print, random: int = 0, pairs: int = 0,
                   seed: int = 0, picture: str | Path | None = None, jobs: int = 1, **overrides) -> dict:
    """Train `recipe_path` (every round of it) on each style image set of `style_cases(images, random, pairs,
    seed)` and measure each on `n_prompts` new-content prompts x `seeds` (`jobs` sets at a time, each in its own
    process with one thread; the numbers do not depend on it); print and return (and write to `out`, after every
    set, with "complete" false until the last) every set's numbers, the worst set's, and the ``[v]`` samples by
    background colour over all sets; `picture`: write the worst set's `before_after` there. With a `workdir`, a
    rerun resumes the runs there. `overrides` ("section.key": value, e.g. "styledrop.rounds": 2) go on top of the
    recipe."""
    import shutil

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cases = style_cases(images, random, pairs, seed)
    setup = {"recipe": str(recipe_path), "overrides": overrides, "base_dir": base_dir, "prompts": n_prompts,
             "seeds": list(seeds), "random": random, "pairs": pairs, "seed": seed, "cases": cases}
    per_image: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="styledrop-eval-") as tmp:
        root = str(Path(workdir) if workdir else Path(tmp))
        args = {name: (str(recipe_path), name, specs, root, n_prompts, tuple(seeds),
                       str(base_dir) if base_dir else None, overrides) for name, specs in cases.items()}

        def done(name: str, numbers: dict) -> None:
            per_image[name] = numbers
            result = eval_result(setup, {n: per_image[n] for n in cases if n in per_image})
            if out:
                Path(out).write_text(json.dumps(result, indent=2) + "\n")
            if picture:  # the worst so far
                shutil.copyfile(Path(root) / result["worst_image"] / "before_after.png", picture)

        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            os.environ["EVAL_WORKER"] = "1"  # one thread per worker
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(measure_case, *a): name for name, a in args.items()}
                for future in as_completed(futures):
                    done(futures[future], future.result())
        else:
            for name, a in args.items():
                done(name, measure_case(*a, print_fn=print_fn))
    result = eval_result(setup, per_image)
    for name, numbers in result["images"].items():
        print_fn(f"{name:<40} " + "  ".join(f"{k} {numbers[k]:.2f}" for k in KEYS))
    worst = result["worst"]
    print_fn("worst image: " + "  ".join(f"{k} {worst[k]:.2f}" for k in KEYS) + f"  ({result['worst_image']})")
    for line in verdict(worst) + background_lines(result["by_background"]):
        print_fn("  " + line)
    return result


def eval_result(setup: dict, per_image: dict[str, dict]) -> dict:
    """What `styledrop_eval` writes: its settings, every measured set (in the order of the cases), the worst one's
    numbers and the by-background totals; "complete" once every case is measured."""
    from amused_tune.toy import toy_dir
    from amused_tune.toy.evaluate import read_sampling_defaults

    folder = Path(setup["base_dir"]) if setup["base_dir"] else toy_dir()
    recipe = load_recipe(setup["recipe"], **setup["overrides"]).styledrop
    cases = setup["cases"]
    return {"recipe": setup["recipe"], "overrides": setup["overrides"], "base": str(folder), "rounds": recipe.rounds,
            "per_prompt": recipe.per_prompt, "adapter_scales": list(recipe.adapter_scales),
            "prompts": setup["prompts"], "seeds": setup["seeds"], "random": setup["random"], "pairs": setup["pairs"],
            "seed": setup["seed"], "sampling": read_sampling_defaults(folder),
            "styles": {name: [world.caption(s) for s in specs] for name, specs in cases.items()},
            "complete": len(per_image) == len(cases), "images": per_image, "worst": summarize(per_image),
            "worst_image": worst_name(per_image), "by_background": background_totals(per_image)}
