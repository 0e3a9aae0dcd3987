"""StyleDrop's rounds in one command (`styledrop.rounds` > 1; docs/styledrop.md).

    round 1   the recipe as written, into OUTPUT_DIR/round-1/
    round k   candidates drawn with round k-1's adapter (`styledrop.prompts`, `per_prompt`, `adapter_scales`) into
              OUTPUT_DIR/round-k/candidates/, the picker's rejects deleted; then a fresh adapter trained with the
              same recipe on the data plus every round's kept candidates (one `data.sources` entry each), into
              OUTPUT_DIR/round-k/, or OUTPUT_DIR itself for the last round (where sample, merge and push look)

Each step is resumable, so rerunning the command continues where it stopped: a round's training resumes from its
checkpoints, a killed candidate draw draws only what is missing (`round2.generate_candidates`), a pick replays its
recorded decisions, and a finished step is skipped. OUTPUT_DIR/styledrop.json records the recipe the rounds belong
to and what each round kept. The picker is passed in by the caller (the toy's classifier lives in a higher layer).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from amused_tune.common import ROUNDS_FILE
from amused_tune.writes import folder_aside, write_file
from amused_tune.recipe import Recipe, RecipeError, SourceConfig
from amused_tune.styledrop.round2 import (CANDIDATES, PICKED, CandidateOptions, generate_candidates, pick,
                                         write_metadata)

MAX_REFERENCES = 8  # style images shown to the picker


def round_dir(out: Path, k: int, rounds: int) -> Path:
    """Round k's run folder: OUTPUT_DIR for the last round, else OUTPUT_DIR/round-k."""
    return out if k == rounds else out / f"round-{k}"


def candidates_dir(out: Path, k: int) -> Path:
    return out / f"round-{k}" / "candidates"


def candidate_prompts(prompts: list[str] | str) -> list[str]:
    """styledrop.prompts: a list, or a text file's prompts (relative paths also from the kit's folder)."""
    from amused_tune.data.prior import prior_prompts

    return prior_prompts(prompts, key="styledrop.prompts")


def with_candidates(data, folders: list[Path]):
    """The data section of a later round: the recipe's own source(s) and one imagefolder source per candidates
    folder (their captions are the prompts they were drawn for)."""
    from amused_tune.data.cards import OWN_KEYS

    own = list(data.sources) or [SourceConfig(**{k: getattr(data, k) for k in OWN_KEYS})]
    drawn = [SourceConfig(source="imagefolder", path=str(f.resolve()), caption_column="text") for f in folders]
    return dataclasses.replace(data, sources=own + drawn, **{k: None for k in OWN_KEYS})


def round_recipe(recipe: Recipe, k: int, folders: list[Path]) -> Recipe:
    """Round k's recipe: a plain run (styledrop.rounds 1) into `round_dir`, on the data and `folders`."""
    r = copy.deepcopy(recipe)
    rounds = recipe.styledrop.rounds
    r.styledrop.rounds = 1
    r.output.dir = str(round_dir(Path(recipe.output.dir), k, rounds))
    if k < rounds:
        r.output.push_to_hub = False  # only the last round's adapter is the result
    if k > 1 and r.train.resume not in ("auto", "none"):  # a checkpoint path belongs to round 1
        r.train.resume = "auto"
    if folders:
        r.data = with_candidates(recipe.data, folders)
    return r.resolve().validate()


def style_images(data) -> list:
    """Up to MAX_REFERENCES of the recipe's local training images (PIL), for the picker's style score."""
    from PIL import Image

    from amused_tune.data.preflight import preflight

    found = []
    for part in preflight(data).parts:
        if part.cfg.source == "hub":
            continue
        for record in part.source().records[: MAX_REFERENCES - len(found)]:
            try:
                found.append(Image.open(record.ref).convert("RGB"))
            except (OSError, ValueError):
                continue
    return found


def _fingerprint(recipe: Recipe) -> str:
    from amused_tune.train.identity import recipe_fingerprint

    return recipe_fingerprint(recipe)


def claim(out: Path, recipe: Recipe) -> dict:
    """The rounds' state in `out` (OUTPUT_DIR/styledrop.json), after checking that the folder holds these rounds or
    nothing; another recipe's rounds (or a plain run) there are refused, or discarded with output.overwrite."""
    from amused_tune.train.outputs import RUN_ARTIFACTS, run_in

    file, fingerprint = out / ROUNDS_FILE, _fingerprint(recipe)
    state = json.loads(file.read_text()) if file.is_file() else None
    other = (state or {}).get("fingerprint", fingerprint) != fingerprint or (state is None and run_in(out))
    restart = state is not None and recipe.train.resume == "none"
    if other or restart:
        if not recipe.output.overwrite:
            why = "StyleDrop rounds of a different recipe" if other else "StyleDrop rounds that train.resume=none " \
                                                                        "would start over"
            raise RecipeError(f"output.dir={out} holds {why}: pick another output.dir, or pass "
                              "--output.overwrite=true to discard them")
        for path in [*out.glob("round-*"), *(out / name for name in RUN_ARTIFACTS)]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        state = None
    state = state or {"fingerprint": fingerprint, "rounds": recipe.styledrop.rounds, "kept": {}}
    out.mkdir(parents=True, exist_ok=True)
    write_file(file, json.dumps(state, indent=2) + "\n", "the rounds' progress")
    return state


def share_prior(done: Path, run: Path) -> None:
    """Round 1's prior images for a later round (the same base, prompts and seeds; data/prior.py checks that)."""
    from amused_tune.data.prior import PRIOR_DIR

    source, target = done / PRIOR_DIR, run / PRIOR_DIR
    if source.is_dir() and not target.exists():
        with folder_aside(target, "round 1's prior images") as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)


def train_round(recipe: Recipe, k: int, rounds: int) -> dict:
    """Train one round; a stop (a signal, a non-finite loss) says which round, and that the same command resumes."""
    from amused_tune.train.loop import TrainingStopped, train

    try:
        return train(recipe)
    except TrainingStopped as err:
        said = str(err).split(" Resume with:")[0].rstrip(".")
        raise TrainingStopped(f"StyleDrop round {k} of {rounds}: {said}. Rerun the same command to resume the "
                              "rounds", err.exit_code, err.error) from None


def run_rounds(recipe: Recipe, make_picker: Callable[[Recipe], Callable], print_fn=print) -> dict:
    """Train every round of `recipe` (styledrop.rounds > 1); returns the last round's training summary, with
    "rounds" (what each later round kept). `make_picker(recipe)` returns the picker, `picker(images, prompts,
    reference) -> list[bool]`; it is called before round 1 when a pick is still to be made, so a picker that cannot
    load fails before anything trains."""
    s = recipe.styledrop
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("styledrop.rounds > 1 runs in one process: start it with amused-tune, not accelerate "
                          "launch, or set styledrop.rounds=1")
    out = Path(recipe.output.dir)
    state = claim(out, recipe)
    prompts = candidate_prompts(s.prompts)
    later = range(2, s.rounds + 1)
    picker = make_picker(recipe) if any(not (candidates_dir(out, k) / PICKED).is_file() for k in later) else None
    references = style_images(recipe.data) if picker is not None else []

    previous, folders = round_recipe(recipe, 1, []), []
    print_fn(f"StyleDrop round 1 of {s.rounds}: {previous.output.dir}")
    summary = train_round(previous, 1, s.rounds)
    for k in later:
        folder = candidates_dir(out, k)
        if not (folder / CANDIDATES).is_file():
            n = len(prompts) * s.per_prompt * len(s.adapter_scales)
            print_fn(f"StyleDrop round {k} of {s.rounds}: {n} candidates drawn by round {k - 1}'s adapter -> {folder}")
        options = CandidateOptions(per_prompt=s.per_prompt, seed=s.seed + 10_000 * (k - 2), reference=False,
                                   adapter_scales=tuple(s.adapter_scales), batch_size=s.batch_size,
                                   device=recipe.train.device or "auto")
        try:
            generate_candidates(previous, Path(previous.output.dir), folder, prompts, options)
            kept, total = pick(folder, picker, references)
            if kept:
                write_metadata(folder)
        except RecipeError:
            raise
        except ValueError as err:  # the round-2 library's one-line errors
            raise RecipeError(f"StyleDrop round {k}: {err}") from None
        state["kept"][str(k)] = [kept, total]
        write_file(out / ROUNDS_FILE, json.dumps(state, indent=2) + "\n", "the rounds' progress")
        said = f"StyleDrop round {k} of {s.rounds}: the {s.picker(recipe.model.base)} picker kept {kept} of {total}"
        if kept:
            folders.append(folder)
            print_fn(f"{said}; training a fresh adapter on them -> {round_dir(out, k, s.rounds)}")
        else:  # nothing to add: this round trains on what the last one had (a longer round 1 may draw the style)
            also = " and the earlier rounds' candidates" if folders else ""
            print_fn(f"warning: {said}: round {k - 1}'s adapter does not draw the style yet, so round {k} trains on "
                     f"the data{also} alone -> {round_dir(out, k, s.rounds)}")
        previous = round_recipe(recipe, k, folders)
        share_prior(round_dir(out, 1, s.rounds), Path(previous.output.dir))
        summary = train_round(previous, k, s.rounds)
    return {**summary, "rounds": {k: tuple(v) for k, v in state["kept"].items()}}

