"""Resumable checkpoints: written aside and renamed into place, pruned only after the new one is complete.

A checkpoint folder ``checkpoints/step-N/`` holds
  trainable.safetensors   every trainable parameter by name (fp32)
  state.pt                optimizer, LR scheduler, grad scaler and every RNG state (tensors and plain values only,
                          read back with ``torch.load(weights_only=True)``)
  meta.json               step, samples consumed, the recipe's fingerprint; written last
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PREFIX = "step-"


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    gauss = py[-1]
    random.setstate((state["python_version"], tuple(py[:-1]), None if gauss == -1 else gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (a folder is complete once its meta.json exists)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    found = [p for p in found if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(
    root: Path, step: int, trainable: dict[str, torch.Tensor], state: dict, meta: dict, keep: int
) -> Path:
    """Write checkpoint `step` atomically, then prune the oldest beyond `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a stale checkpoint of the same step (e.g. a rerun): replace it only now
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, state, meta) of one checkpoint; raises on a corrupt one."""
    meta = json.loads((path / "meta.json").read_text())
    trainable = load_file(path / "trainable.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return trainable, state, meta


def load_latest(root: Path) -> tuple[Path, dict[str, torch.Tensor], dict, dict] | None:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            return (path, *load_checkpoint(path))
        except Exception as err:  # truncated file, bad json, ...
            log.warning("checkpoint %s is corrupt (%s): trying the previous one", path, err)
    return None
