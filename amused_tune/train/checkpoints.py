"""Resumable checkpoints: written aside and renamed into place, pruned only after the new one is complete.

A checkpoint folder ``checkpoints/step-N/`` holds
  trainable.safetensors   every trainable parameter by name (fp32)
  state.pt                optimizer, LR scheduler, grad scaler, and the RNG states of every process (torch, CUDA,
                          numpy, python, the mask and dropout generators), as a list indexed by process; tensors and
                          plain values only, read back with ``torch.load(weights_only=True)``
  recipe.yaml             the resolved recipe of the run that wrote it (with package versions and fingerprint)
  meta.json               step, samples consumed per process, the recipe's fingerprint and the size of every file
                          above; written last

The folder is first written as ``checkpoints/.tmp-step-N-PID/`` and renamed to ``step-N`` only once every file is
complete and synced, so ``step-N`` either is complete or does not exist: a process killed while saving (SIGKILL,
power loss, a full disk) leaves at most a ``.tmp-*`` folder, which `list_checkpoints` ignores and the next save
removes. Older checkpoints are pruned only after the rename. The data order needs no state of its own: it is a
function of the seed and the number of samples consumed (``meta.json``), see `train.setup.EpochSampler`.

The trainer calls `save` (gather every process's RNG states, the main process writes), `resume` (weights,
optimizer, schedule) and, once its data loader exists, `restore_rng`. docs/resume.md describes the behaviour.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from amused_tune.common import RECIPE_FILE
from amused_tune import writes
from amused_tune.writes import folder_aside, write_into
from amused_tune.optimizers import hyperparameters
from amused_tune.recipe import Recipe, RecipeError
from amused_tune.train.identity import recipe_fingerprint, recipe_yaml

log = logging.getLogger(__name__)

PREFIX = "step-"
TMP_PREFIX = f"{writes.TMP_PREFIX}{PREFIX}"  # a checkpoint being written (amused_tune.writes.folder_aside)
OLD_PREFIX = f"{writes.OLD_PREFIX}{PREFIX}"
FILES = ("trainable.safetensors", "state.pt", RECIPE_FILE)
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated or corrupt)."""


# --------------------------------------------------------------------------------------------- RNG


def _python_state(rng) -> dict:
    version, mt, gauss = rng.getstate()
    return {"version": version, "mt": list(mt), "gauss": gauss}


def _set_python_state(rng, state: dict) -> None:
    rng.setstate((state["version"], tuple(state["mt"]), state["gauss"]))


def rng_state(generators: dict[str, torch.Generator | random.Random]) -> dict:
    """Every RNG state of this process: python, numpy, torch (CPU and CUDA) and the named generators (torch
    generators, or `random.Random`s such as a dataset's augmentation RNG)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _python_state(random),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() if isinstance(g, torch.Generator) else _python_state(g)
                       for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator | random.Random]) -> None:
    """Restore what `rng_state` captured (in this process); a generator the checkpoint lacks is left as it is."""
    _set_python_state(random, state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        saved = state["generators"].get(name)
        if saved is None:
            log.warning("the checkpoint holds no state for the %s RNG: it continues from its seed", name)
        elif isinstance(g, torch.Generator):
            g.set_state(saved)
        else:
            _set_python_state(g, saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- writing


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place (their meta.json exists), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    found = [p for p in found if (p / "meta.json").is_file()]
    return sorted(found, key=step_of)


def save_checkpoint(
    root: Path, step: int, trainable: dict[str, torch.Tensor], state: dict, meta: dict, keep: int,
    recipe_text: str = "",
) -> Path:
    """Write checkpoint `step` aside, rename it into place, then prune the oldest beyond `keep`.

    On any failure (a full disk, an interrupt) the partial folder is removed and the previous checkpoints are
    untouched; a write error is raised as an OSError naming the file.
    """
    final = root / f"{PREFIX}{step}"
    what = f"checkpoint step {step}"
    with folder_aside(final, what) as tmp:
        def put(name: str, writer) -> None:
            write_into(tmp / name, writer, what, shown=final / name)

        put("trainable.safetensors", lambda f: save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}, str(f)))
        put("state.pt", lambda f: _torch_save(state, f))
        put(RECIPE_FILE, lambda f: f.write_text(recipe_text))
        sizes = {name: (tmp / name).stat().st_size for name in FILES}
        full_meta = {**meta, "step": step, "format": FORMAT, "files": sizes}
        put("meta.json", lambda f: f.write_text(json.dumps(full_meta, indent=2, default=str)))
    for previous in list_checkpoints(root)[:-keep]:
        shutil.rmtree(previous, ignore_errors=True)
    for stale in list(root.glob(f"{TMP_PREFIX}*")) + list(root.glob(f"{OLD_PREFIX}*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
    return final


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, whose write says ENOSPC (torch's own writer says "unexpected pos")."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


# --------------------------------------------------------------------------------------------- reading


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, state, meta) of one checkpoint; raises CheckpointError on a missing or corrupt one."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, size in meta.get("files", {}).items():
            actual = (path / name).stat().st_size
            if actual != size:
                raise CheckpointError(f"{name} has {actual} bytes, {size} were written")
        trainable = load_file(path / "trainable.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: {err}") from err
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} is incomplete: {Path(err.filename or '').name} is missing") from err
    except Exception as err:  # truncated safetensors or zip, bad json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt: {first}") from err
    return trainable, state, meta


def load_latest(root: Path) -> tuple[Path, dict[str, torch.Tensor], dict, dict] | None:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning. None: no usable checkpoint."""
    found = list_checkpoints(root)
    for path in reversed(found):
        try:
            return (path, *load_checkpoint(path))
        except CheckpointError as err:
            log.warning("%s: trying the previous checkpoint", err)
    return None


def load_from(where: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict, dict]:
    """The checkpoint named by `train.resume=PATH`: a ``step-N`` folder, or the newest readable one of an output dir
    (or of its checkpoints/ folder). Raises CheckpointError when there is none or the named one is corrupt."""
    path = Path(where).expanduser()
    if (path / "meta.json").is_file():
        return (path, *load_checkpoint(path))
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            found = load_latest(root)
            if found is not None:
                return found
    raise CheckpointError(f"train.resume={where}: no readable checkpoint there")


# --------------------------------------------------------------------------------------------- the trainer's side


@dataclass
class Resumed:
    """What `resume` restored: the checkpoint, its step, the skipped-step count and every process's RNG states."""

    path: Path
    step: int
    skipped: int
    rng: list[dict]


def save(run, step: int, skipped: int = 0) -> None:
    """Checkpoint `step` of `run` (train.loop.Run: its recipe, output folder, trainable weights and their names,
    optimizer, schedule, accelerator, RNGs and EMA). Every process's RNG states are gathered; the main process
    writes; all wait for it."""
    recipe, optimizer, accelerator, ema = run.recipe, run.optimizer, run.accelerator, run.ema
    rng = rng_state(run.rngs)
    rngs = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    if accelerator.is_main_process:
        t = recipe.train
        state = {"optimizer": optimizer.state_dict(), "scheduler": run.lr_scheduler.state_dict(), "rng": rngs}
        if ema is not None:  # train.ema_decay: the average, next to the trained weights that resume continues
            state["ema"] = ema.state_dict()
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        weights = {run.names[id(p)]: p for p in run.trainable}
        meta = {
            "recipe_fingerprint": recipe_fingerprint(recipe),
            "samples_per_process": step * t.batch_size * t.grad_accum,
            "num_processes": accelerator.num_processes,
            "effective_batch": t.batch_size * t.grad_accum * accelerator.num_processes,
            "max_steps": t.max_steps,
            "skipped_nonfinite": skipped,
            "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
            "recipe": recipe.to_dict(),
        }
        save_checkpoint(run.out / "checkpoints", step, weights, state, meta, t.keep_checkpoints,
                        recipe_text=recipe_yaml(recipe))
    accelerator.wait_for_everyone()


def resume(run) -> Resumed | None:
    """Restore `run`'s weights, optimizer, schedule, scaler and EMA (train.loop.Run) from the checkpoint
    `train.resume` names (auto: the newest readable one of output.dir; corrupt ones are skipped with a warning).
    None: nothing to resume from.

    The RNG states are restored later by `restore_rng`, once the data loader exists.
    """
    recipe, out, accelerator = run.recipe, run.out, run.accelerator
    optimizer, lr_scheduler = run.optimizer, run.lr_scheduler
    where = recipe.train.resume
    try:
        found = load_latest(out / "checkpoints") if where == "auto" else load_from(where)
    except CheckpointError as err:
        raise RecipeError(f"{err}: pass a checkpoints/step-N folder or an output dir that holds one as "
                          "train.resume, or train.resume=auto") from err
    if found is None:
        if list_checkpoints(out / "checkpoints"):
            log.warning("no checkpoint in %s could be read: starting from step 0", out / "checkpoints")
        return None
    path, weights, state, meta = found
    by_name = {run.names[id(p)]: p for p in run.trainable}
    _check_weights(path, weights, by_name)
    if meta.get("recipe_fingerprint") != recipe_fingerprint(recipe):
        log.warning("checkpoint %s was written by a different recipe: continuing from its weights and optimizer "
                    "state with this recipe's settings", path)
    with torch.no_grad():
        for name, p in by_name.items():
            p.copy_(weights[name].to(p.dtype))
    resume_ema(run.ema, state, path)
    kind = type(getattr(optimizer, "optimizer", optimizer)).__name__
    if meta.get("optimizer", kind) == kind:
        optimizer.load_state_dict(state["optimizer"])
    else:
        log.warning("checkpoint %s used %s, this recipe %s: the optimizer starts with a fresh state",
                    path, meta["optimizer"], kind)
    o = recipe.optim
    for group in optimizer.param_groups:  # this recipe's hyperparameters (the same values when it is the same recipe)
        group.update({k: v for k, v in hyperparameters(o).items() if k in group})
        if group["weight_decay"]:  # the decayed group (see train.setup.param_groups)
            group["weight_decay"] = o.weight_decay
    lr_scheduler.load_state_dict(state["scheduler"])
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is not None:  # the next step's lr from this recipe's schedule (max_steps may have changed)
        lr_scheduler.base_lrs = [o.lr for _ in lr_scheduler.base_lrs]
        for group, base, fn in zip(optimizer.param_groups, lr_scheduler.base_lrs, lambdas):
            group["lr"] = base * fn(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if o.scheduler != "constant" and meta.get("max_steps", recipe.train.max_steps) != recipe.train.max_steps:
        log.warning("train.max_steps changed from %s to %s: the %s schedule continues from step %s as if the run "
                    "had always been %s steps long", meta["max_steps"], recipe.train.max_steps, o.scheduler,
                    meta["step"], recipe.train.max_steps)
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = state.get("rng") or []
    accelerator.print(f"resumed from {path} (step {meta['step']})")
    return Resumed(path, int(meta["step"]), int(meta.get("skipped_nonfinite", 0)),
                   rng if isinstance(rng, list) else [rng])


def resume_ema(ema, state: dict, path: Path) -> None:
    """The EMA from the checkpoint; one that holds none (EMA turned on when resuming) starts from its weights."""
    if ema is None:
        return
    if "ema" in state:
        ema.load_state_dict(state["ema"])
        return
    log.warning("checkpoint %s holds no EMA (train.ema_decay was 0): the average starts from its weights", path)
    ema.load_state_dict({"updates": 0, "weights": {n: p.detach() for n, p in zip(ema.names, ema.params)}})


def _check_weights(path: Path, saved: dict[str, torch.Tensor], wanted: dict[str, torch.nn.Parameter]) -> None:
    """Refuse a checkpoint whose trainable weights are not this recipe's (another rank, adapter kind or base)."""
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = [n for n in sorted(set(saved) & set(wanted)) if tuple(saved[n].shape) != tuple(wanted[n].shape)]
    if not (missing or extra or shapes):
        return
    if shapes:
        n = shapes[0]
        detail = f"{n} has shape {tuple(saved[n].shape)} there, {tuple(wanted[n].shape)} here"
    elif missing:
        detail = f"{len(missing)} of this recipe's trainable weights are missing there, e.g. {missing[0]}"
    else:
        detail = f"it holds {len(extra)} weights this recipe does not train, e.g. {extra[0]}"
    raise RecipeError(
        f"checkpoint {path} was written for another adapter or base model ({detail}): resume it with its own recipe "
        f"({path / 'recipe.yaml'}), or pass train.resume=none"
    )


def dataset_rngs(dataset) -> dict[str, random.Random]:
    """The dataset's own augmentation RNG, when it has one: it serves items fetched by a plain index. The trainer
    fetches (index, seed) pairs whose draws depend on the seed alone (data.preprocess.item_draws), which resume
    exactly with any data.num_workers."""
    rng = getattr(dataset, "rng", None)
    return {"data": rng} if isinstance(rng, random.Random) else {}


def restore_rng(resumed: Resumed | None, generators: dict, accelerator, recipe: Recipe) -> None:
    """This process's RNG states from the checkpoint. A checkpoint of another process count restores what it can
    and reseeds the mask and dropout generators: the run continues, but not exactly as it would have."""
    if resumed is None or not resumed.rng:
        return
    rank, world = accelerator.process_index, accelerator.num_processes
    set_rng_state(resumed.rng[rank % len(resumed.rng)], generators)
    if len(resumed.rng) != world:
        if accelerator.is_main_process:
            log.warning("checkpoint %s was written by %d processes, this run has %d: the data order and masks "
                        "differ from an uninterrupted run", resumed.path, len(resumed.rng), world)
        for i, g in enumerate(generators.values()):
            reseed = (recipe.train.seed * 1_000_003 + rank) * 7919 + resumed.step * 2 + i
            if isinstance(g, torch.Generator):
                g.manual_seed(reseed)
            else:
                g.seed(reseed)
