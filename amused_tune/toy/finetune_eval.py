"""What fine-tuning the toy taught: ``python -m amused_tune.toy eval --adapter RUN_DIR``.

Numbers over fixed prompts and seeds, with the toy's sampling defaults (`sampling.json`); which ones depends on
what the run teaches (`run_kind`, from its recipe):

- ``world`` (every run): caption match on 50 world prompts x 2 seeds (did the run keep what the base knew?);
- a concept run (its prompts name `world.CONCEPT`): ``concept``, caption match on the new concept in the 6
  combinations that its fine-tuning set leaves out, x 4 seeds (did it learn the concept, not the images?);
- a style run (its prompts say ``[v] style``): ``style_with``, on 25 world prompts + " in [v] style" x 2 seeds,
  the share that shows the style, ``style_match`` the share that also matches the shape, colour and background,
  ``style_without`` the style's share on the world prompts without ``[v] style`` (did it leak?), and
  ``style_by_background``: the first two per background colour of the prompt (where the style is missing).

A run whose recipe says neither gets all of them. The base's numbers come from the same function; a run's go to
``RUN_DIR/eval.json``, which the model card renders (`toy/report.py`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml

from amused_tune.model.bases import Components
from amused_tune.toy import world
from amused_tune.train.validation import write_before_after
from amused_tune.share.card import EVAL_SECTION
from amused_tune.toy.evaluate import _sampler_kwargs, eval_prompts, match_rate
from amused_tune.toy.report import eval_lines
from amused_tune.writes import write_file

EVAL_FILE = "eval.json"


def concept_prompts() -> list[str]:
    return [world.caption(s) for s in world.concept_split()[1]]


def style_prompts(n: int = 25) -> list[str]:
    return [p + world.STYLE_SUFFIX for p in eval_prompts(n, seed=1)]


def run_kind(run: Path) -> str | None:
    """"style" when the run's recipe asks for the ``[v] style`` (its data prompt or validation prompts), "concept"
    when they name the new concept's colour, else None (measure everything)."""
    try:
        raw = yaml.safe_load((Path(run) / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    prompts = (raw.get("validation") or {}).get("prompts") or []
    texts = [str(t) for t in ([(raw.get("data") or {}).get("prompt")] + list(prompts)) if t]
    if any(world.STYLE_SUFFIX.strip() in t for t in texts):
        return "style"
    if any(world.CONCEPT in t.split() for t in texts):
        return "concept"
    return None


def by_background(result) -> dict:
    """Per background colour of the prompts: samples, the share showing the style, the share showing the style and
    the caption."""
    rows: dict[str, list[tuple[bool, bool]]] = {}
    for found, prompt in zip(result.found, result.prompts):
        background = world.parse_caption(prompt)[2]
        rows.setdefault(background, []).append((found.style, found.style and found.matches(prompt)))
    return {bg: {"samples": len(r), "style_with": sum(a for a, _ in r) / len(r), "style_match": sum(b for _, b in r)
                 / len(r)} for bg, r in sorted(rows.items(), key=lambda kv: world.WORLD_COLOURS.index(kv[0]))}


@torch.no_grad()
def finetune_numbers(comps: Components, settings: dict, print_fn=print, kind: str | None = None, **sample_kw) -> dict:
    """The numbers of the module docstring for `comps` (a base, or a base with an adapter loaded); `kind`: the
    run's (`run_kind`), None for all of them."""
    kw = {**_sampler_kwargs(settings), **sample_kw}
    if "styledrop" in sample_kw:
        kw.pop("guidance", None)
    w = match_rate(comps, eval_prompts(50), (0, 1), **kw)
    numbers = {"world": w.rate}
    if kind in (None, "concept"):
        numbers["concept"] = match_rate(comps, concept_prompts(), (0, 1, 2, 3), **kw).rate
    if kind in (None, "style"):
        s = match_rate(comps, style_prompts(), (0, 1), **kw)
        styled = [f.style and f.matches(p) for f, p in zip(s.found, s.prompts)]
        numbers.update(style_with=s.style_rate, style_match=sum(styled) / len(styled), style_without=w.style_rate,
                       style_by_background=by_background(s))
    print_fn("  ".join(f"{k} {v:.3f}" for k, v in numbers.items() if isinstance(v, float)))
    if "style_by_background" in numbers:
        print_fn("  by background (style / style and caption, samples): " + "  ".join(
            f"{bg} {r['style_with']:.2f}/{r['style_match']:.2f} ({r['samples']})"
            for bg, r in numbers["style_by_background"].items()))
    return numbers


SWEEP_CFG = (1.0, 2.0, 3.0, 5.0)
SWEEP_STYLEDROP = ((0.5, 1.0), (1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (2.0, 2.0), (3.0, 1.0))


@torch.no_grad()
def style_numbers(comps: Components, **kw) -> dict:
    """Style shown / style + caption matched on 25 prompts with `[v] style`, style leaked on the same 25 without
    (x 2 seeds each)."""
    s = match_rate(comps, style_prompts(), (0, 1), **kw)
    w = match_rate(comps, eval_prompts(25, seed=1), (0, 1), **kw)
    return {"style_with": s.style_rate, "style_match": sum(f.style and f.matches(p) for f, p in zip(s.found, s.prompts))
            / len(s.found), "world": w.rate, "style_without": w.style_rate}


def styledrop_sweep(base: Components, run: Path, settings: dict, print_fn=print) -> dict:
    """Plain classifier-free guidance at `SWEEP_CFG` against StyleDrop guidance at each (lambda_a, lambda_b) of
    `SWEEP_STYLEDROP`, on the run's LoRA."""
    tuned = _apply_run(base, Path(run))
    kw = {k: v for k, v in _sampler_kwargs(settings).items() if k != "guidance"}
    rows = {}
    for g in SWEEP_CFG:
        rows[f"cfg {g:g}"] = style_numbers(tuned, guidance=g, **kw)
        print_fn(f"cfg {g:g}: " + "  ".join(f"{k} {v:.2f}" for k, v in rows[f"cfg {g:g}"].items()))
    for a, b in SWEEP_STYLEDROP:
        rows[f"styledrop {a:g} {b:g}"] = style_numbers(tuned, styledrop=(a, b), **kw)
        print_fn(f"styledrop lambda_a {a:g} lambda_b {b:g}: "
                 + "  ".join(f"{k} {v:.2f}" for k, v in rows[f"styledrop {a:g} {b:g}"].items()))
    return rows


def _apply_run(comps: Components, run: Path, adapter: str = "adapter") -> Components:
    """A copy of `comps` with the run's result in it: its LoRA loaded (unmerged; `adapter`: the folder, adapter-raw
    for a run's last trained weights when it kept an EMA), or its full U-ViT."""
    from amused_tune.model.adapters import load_lora

    comps = copy.copy(comps)
    if (run / "transformer").is_dir():
        from diffusers import UVit2DModel

        comps.transformer = UVit2DModel.from_pretrained(run / "transformer", use_safetensors=True).eval()
    elif (run / adapter).is_dir():
        comps.transformer = copy.deepcopy(comps.transformer)
        load_lora(comps.transformer, run / adapter)
    else:
        raise FileNotFoundError(f"{run} holds neither adapter/ nor transformer/: pass the output.dir of a finished run")
    return comps


def run_styledrop(run: Path) -> tuple[float, float] | None:
    """The run's StyleDrop guidance (lambda_a, lambda_b) from its recipe's validation, if it set one."""
    recipe = run / "recipe.yaml"
    if not recipe.is_file():
        return None
    sd = (yaml.safe_load(recipe.read_text()) or {}).get("validation", {}).get("styledrop")
    return tuple(sd) if sd else None


def evaluate_run(base: Components, run: Path, settings: dict, print_fn=print, base_numbers: dict | None = None) -> dict:
    """The base's numbers (`base_numbers` when already measured) and the run's, written to RUN_DIR/eval.json."""
    run = Path(run)
    kind = run_kind(run)
    print_fn(f"what the run teaches: {kind or 'not said by its recipe (every number measured)'}")
    print_fn("base:")
    before = base_numbers or finetune_numbers(base, settings, print_fn, kind)
    tuned = _apply_run(base, run)
    print_fn("fine-tuned:")
    after = finetune_numbers(tuned, settings, print_fn, kind)
    result = {"kind": kind, "base": before, "adapter": after, "sampling": settings}
    if (run / "adapter-raw").is_dir():  # train.ema_decay: adapter/ is the EMA; the last trained weights, for comparison
        print_fn("fine-tuned, raw (the last trained weights; adapter/ above holds their EMA):")
        result["adapter_raw"] = finetune_numbers(_apply_run(base, run, "adapter-raw"), settings, print_fn, kind)
    sd = run_styledrop(run)
    if sd is not None and (run / "adapter").is_dir():
        print_fn(f"fine-tuned, StyleDrop guidance lambda_a={sd[0]} lambda_b={sd[1]}:")
        result["adapter_styledrop"] = {"lambda_a": sd[0], "lambda_b": sd[1],
                                       **finetune_numbers(tuned, settings, print_fn, kind, styledrop=sd)}
    write_file(run / EVAL_FILE, json.dumps(result, indent=2) + "\n", "the evaluation")
    write_file(run / EVAL_SECTION, "\n".join(eval_lines(run)) + "\n", "the evaluation")  # the model card includes it
    write_before_after(run)
    if (run / "recipe.yaml").is_file():  # the model card shows these numbers: write it again
        from amused_tune.share.card import write_card

        write_card(run, yaml.safe_load((run / "recipe.yaml").read_text()) or {})
    return result
