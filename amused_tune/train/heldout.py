"""The held-out loss (`validation.holdout: N`): N images kept out of training, scored the same way at every
validation step, so that the numbers compare step to step.

The N images are drawn once from the usable samples by `train.seed` (the rest is what the run trains on). Each is
scored with its text (no condition dropout), one fixed crop/flip variant, at each of the mask rates `RATES` with
masks drawn from fixed seeds: the held-out loss is the mean over images and rates of the masked-token
cross-entropy (no label smoothing). Training draws a new mask rate and mask every step, so its loss is noisy;
this one moves only when the weights do. Train loss falling while the held-out loss rises is overfitting: the
weights of the held-out minimum generalise best (docs/options.md shows a run).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from amused_tune.data.datasets import collate
from amused_tune.train.ema import swap
from amused_tune.model.masking import masked_cross_entropy
from amused_tune.model.bases import encode_images
from amused_tune.recipe import RecipeError
from amused_tune.train.report import say
from amused_tune.train.step import batch_conditioning

RATES = (0.3, 0.5, 0.7, 0.9)  # share of each image's tokens masked
SEED = 20_240_101  # seeds of the variants and masks: the same at every step and in every run


class Part(Dataset):
    """The items `indices` of `dataset`, fetched by a plain index or by (index, seed) like the dataset itself."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    @property
    def rng(self):  # the dataset's own augmentation RNG (saved in checkpoints)
        return getattr(self.dataset, "rng", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]


def split(dataset: Dataset, count: int, seed: int) -> tuple[Dataset, Part | None]:
    """(what the run trains on, the held-out part or None): `count` items drawn by `seed`."""
    if not count:
        return dataset, None
    n = len(dataset)
    if count >= n:
        raise RecipeError(f"validation.holdout={count} would hold out every image ({n} usable): hold out fewer")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + 17)).tolist()
    return Part(dataset, sorted(order[count:])), Part(dataset, sorted(order[:count]))


def fixed_mask(tokens: torch.Tensor, mask_id: int, rate: float, generator: torch.Generator):
    """(input ids, mask): exactly round(rate x tokens) of each image's tokens masked, drawn from `generator`."""
    b, h, w = tokens.shape
    k = max(1, round(rate * h * w))
    chosen = torch.rand(b, h * w, generator=generator).argsort(dim=1)[:, :k]
    mask = torch.zeros(b, h * w, dtype=torch.bool).scatter_(1, chosen, True).reshape(b, h, w).to(tokens.device)
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask


class HeldOut:
    """Scores the held-out part; `due(step)` follows validation.every (and step 0 and the last step)."""

    def __init__(self, part: Part, recipe, comps, device):
        self.recipe, self.comps, self.device = recipe, comps, device
        self.batch = collate([part[(i, SEED + i)] for i in range(len(part))])
        with torch.no_grad():
            tokens = self.batch.pop("tokens", None)
            pixels = self.batch.pop("pixels", None)
            self.tokens = (tokens if tokens is not None else encode_images(comps.vqvae, pixels)).long().cpu()

    def due(self, step: int) -> bool:
        v, t = self.recipe.validation, self.recipe.train
        return step % v.every == 0 or step == t.max_steps

    @torch.no_grad()
    def __call__(self, transformer: torch.nn.Module, empty, accelerator) -> float:
        """The mean masked-token cross-entropy over images and `RATES` (transformer in eval mode meanwhile)."""
        was_training = transformer.training
        transformer.eval()
        size, n, total = self.recipe.train.batch_size, len(self.tokens), 0.0
        for r, rate in enumerate(RATES):
            generator = torch.Generator().manual_seed(SEED + r)
            for start in range(0, n, size):
                chunk = {k: v[start:start + size] for k, v in self.batch.items()}
                tokens = self.tokens[start:start + size].to(self.device)
                input_ids, mask = fixed_mask(tokens, self.comps.mask_id, rate, generator)
                keep = torch.zeros(len(tokens), dtype=torch.bool)
                cond = batch_conditioning(chunk, self.comps, empty, keep, self.recipe.adapter.text_encoder, self.device)
                with accelerator.autocast():
                    logits = transformer(input_ids, encoder_hidden_states=cond.hidden, pooled_text_emb=cond.pooled,
                                         micro_conds=chunk["micro_conds"].to(self.device))
                total += masked_cross_entropy(logits, tokens, mask).item() * len(tokens)
        transformer.train(was_training)
        return total / (n * len(RATES))


def make(part: Part | None, recipe, comps, device) -> HeldOut | None:
    return HeldOut(part, recipe, comps, device) if part is not None else None


def record(run, metrics, step: int) -> float | None:
    """Score the held-out part after `step` when due (main process, EMA weights when the run keeps them): a row
    {"step", "heldout_loss"} in metrics.jsonl and the trackers. Returns the loss, or None when not due."""
    if run.heldout is None or not run.main or not run.heldout.due(step):
        return None
    swap(run.ema)
    try:
        loss = run.heldout(run.comps.transformer, run.empty, run.accelerator)
    finally:
        swap(run.ema)
    metrics.write({"step": step, "heldout_loss": loss})
    if run.accelerator.trackers:
        run.accelerator.log({"heldout_loss": loss}, step=step)
    say(f"held-out loss after step {step}: {loss:.4f}")
    return loss
