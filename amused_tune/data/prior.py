"""Prior preservation (recipe section `prior`): the base's own images for prompts without the new token, trained
on beside the training images so that an adapter changes only what the new token asks for (DreamBooth's
class-prior loss).

`with_prior` is called once the training data is ready and before any adapter is attached. The base samples
`prior.images_per_prompt` images per prompt with the kit's sampler at its sampling defaults (sampling.json), as VQ
tokens (nothing is decoded or re-encoded), and the main process writes them, with their text embeddings, to
OUTPUT_DIR/prior/prior.safetensors next to prior.json (what they were drawn with). Every process then reads that
file, so all processes and a resumed run train on exactly the same prior images; a file drawn with other
settings is drawn again.

The returned dataset pairs each training item with one prior item (`item["prior"]`, a training item of its own);
the training step adds `prior.weight` x the loss of those (train/step.py). Its length is the larger of the two
sets, so one epoch shows every prior image once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from amused_tune.common import torch_dtype
from amused_tune.data.sources import resolve_path
from amused_tune.recipe import RecipeError
from amused_tune.writes import write_file, write_with

PRIOR_DIR = "prior"
PRIOR_FILE = "prior.safetensors"
PRIOR_INFO = "prior.json"


def read_prompt_file(path: str | Path, label: str) -> list[str]:
    """The non-blank lines of a text file, lines starting with # skipped; ValueError naming `label` otherwise."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{label} {path} is a folder: pass a text file, one prompt per line")
    if not file.is_file():
        raise ValueError(f"{label} {path}: no such file; pass a text file, one prompt per line")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise ValueError(f"{label} {path}: no prompts in it (one per line)")
    return found


def prior_prompts(prompts: list[str] | str, key: str = "prior.prompts") -> list[str]:
    """The recipe's prior.prompts (or another prompts key, `key`): a list, or a text file's prompts (relative paths
    also from the kit's folder)."""
    if not isinstance(prompts, str):
        return [p for p in prompts if p.strip()]
    try:
        return read_prompt_file(resolve_path(prompts), f"{key}=")
    except ValueError as err:
        raise RecipeError(str(err).replace(f"{key}= ", f"{key}=")) from None


class PriorDataset(Dataset):
    """Training items, each with one prior item under "prior" (item i gets prior image i modulo their number)."""

    def __init__(self, data: Dataset, prior: list[dict]):
        self.data, self.prior = data, prior

    @property
    def rng(self):  # the training items' augmentation RNG (checkpoints save it)
        return getattr(self.data, "rng", None)

    def __len__(self) -> int:
        return max(len(self.data), len(self.prior))

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        inner = index % len(self.data)
        item = dict(self.data[(inner, seed) if seed is not None else inner])
        item["prior"] = self.prior[index % len(self.prior)]
        return item


def with_prior(recipe, comps, dataset: Dataset, accelerator) -> Dataset:
    """`dataset` with the base's prior images paired in (see the module docstring), or `dataset` when
    prior.prompts is empty. Call before any adapter is attached."""
    prompts = prior_prompts(recipe.prior.prompts)
    if not prompts:
        return dataset
    folder = Path(recipe.output.dir) / PRIOR_DIR
    info = _info(recipe, prompts)
    if accelerator.is_main_process and not _cached(folder, info):
        _draw(recipe, comps, prompts, folder, info, accelerator.device)
    accelerator.wait_for_everyone()
    from safetensors.torch import load_file

    stored = load_file(folder / PRIOR_FILE)
    with_text = "hidden" in dataset[(0, 0)]
    names = [p for p in prompts for _ in range(recipe.prior.images_per_prompt)]
    items = []
    for i, prompt in enumerate(names):
        item = {"tokens": stored["tokens"][i], "prompt": prompt, "micro_conds": stored["micro_conds"][i]}
        if with_text:
            item.update(hidden=stored["hidden"][i], pooled=stored["pooled"][i])
        items.append(item)
    accelerator.print(f"prior preservation: {len(items)} images of the base ({len(prompts)} prompts), "
                      f"weight {recipe.prior.weight:g}, in {folder}")
    return PriorDataset(dataset, items)


def _info(recipe, prompts: list[str]) -> dict:
    from amused_tune.model.sampling_defaults import resolve_sampling

    sampling, _ = resolve_sampling(recipe.model.base)
    return {"base": recipe.model.base, "prompts": prompts, "images_per_prompt": recipe.prior.images_per_prompt,
            "seed": recipe.prior.seed, "dtype": recipe.model.dtype, "sampling": json.loads(json.dumps(sampling))}


def _cached(folder: Path, info: dict) -> bool:
    try:
        return (folder / PRIOR_FILE).is_file() and json.loads((folder / PRIOR_INFO).read_text()) == info
    except (OSError, ValueError):
        return False


@torch.no_grad()
def _draw(recipe, comps, prompts: list[str], folder: Path, info: dict, device) -> None:
    """Sample the prior images with the base (tokens) and write them with their text embeddings."""
    from safetensors.torch import save_file

    from amused_tune.model.bases import encode_prompts, micro_conditioning
    from amused_tune.sampling.sampler import sample_tokens

    transformer = comps.transformer
    dtype = torch_dtype(recipe.model.dtype) if recipe.adapter.kind == "lora" else torch.float32
    if device.type == "cpu":
        dtype = torch.float32
    if next(transformer.parameters()).dtype != dtype:
        transformer.to(dtype)
    transformer.to(device).eval()
    n = recipe.prior.images_per_prompt
    hidden, pooled = encode_prompts(comps.text_encoder, comps.tokenizer, prompts)
    empty = encode_prompts(comps.text_encoder, comps.tokenizer, [""])
    hidden, pooled = hidden.repeat_interleave(n, 0), pooled.repeat_interleave(n, 0)
    res = comps.resolution
    micro = micro_conditioning(res, res)
    settings = dict(info["sampling"])
    settings["temperature"] = tuple(settings["temperature"]) if isinstance(settings["temperature"], list) else \
        settings["temperature"]
    tokens = []
    batch = max(1, min(16, 1024 // (res // 16) ** 2))  # images drawn at a time: 16 on the toy, 4 at 256 px, 1 at 512
    for start in range(0, len(hidden), batch):
        cond = tuple(t[start: start + batch].to(device, dtype) for t in (hidden, pooled))
        uncond = tuple(t.to(device, dtype) for t in empty)
        seeds = [recipe.prior.seed + i for i in range(start, start + len(cond[0]))]
        tokens.append(sample_tokens(transformer, cond, uncond, seeds, micro_conds=micro.to(device), **settings).cpu())
    if recipe.model.quantize:  # quantizing starts from the CPU
        transformer.to("cpu")
    tensors = {"tokens": torch.cat(tokens).contiguous(), "hidden": hidden.contiguous(), "pooled": pooled.contiguous(),
               "micro_conds": micro.expand(len(hidden), -1).contiguous()}
    (folder / PRIOR_INFO).unlink(missing_ok=True)  # until both files are written, the draw is not done
    write_with(folder / PRIOR_FILE, lambda tmp: save_file(tensors, str(tmp)), "the prior images")
    write_file(folder / PRIOR_INFO, json.dumps(info, indent=1) + "\n", "the prior images' settings")
