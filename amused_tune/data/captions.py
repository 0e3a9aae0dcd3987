"""Caption rules applied to every training prompt: a trigger word in front, comma-separated tags shuffled.

- `data.trigger_word`: written in front of every prompt as its first tag ("sks, a photo of a dog"); it is part of
  the prompt the cache encodes, and never moves.
- `data.shuffle_tags`: each time a sample is drawn, the comma-separated tags of its prompt after the first
  `data.keep_tags` (and after the trigger word) are put in a random order, drawn from the sample's seed (so a
  resumed run draws the same orders). The model then learns each tag, not the order the captioner wrote them in.
  Shuffled prompts cannot come from the text-embedding cache (there are too many orders): the text encoder stays
  on the device and encodes each batch's prompts (the image tokens are still cached).
- `data.caption_dropout` is not applied here: it is the same mechanism as `train.cond_dropout` (the sample's text
  conditioning replaced by the empty prompt's), see recipe.DataConfig.
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset

SEPARATOR = ","


def with_trigger(prompt: str, trigger: str | None) -> str:
    """`prompt` with the trigger word as its first tag (unchanged without one, or when it already starts so)."""
    if not trigger or prompt.split(SEPARATOR, 1)[0].strip() == trigger.strip():
        return prompt
    return f"{trigger.strip()}{SEPARATOR} {prompt}" if prompt.strip() else trigger.strip()


def shuffle_tags(prompt: str, keep: int, rng: random.Random, trigger: str | None = None) -> str:
    """The tags of `prompt` after the first `keep` (and after the trigger word) in an order drawn from `rng`."""
    tags = [t.strip() for t in prompt.split(SEPARATOR)]
    fixed = keep + (1 if trigger and tags[0] == trigger.strip() else 0)
    head, tail = tags[:fixed], tags[fixed:]
    rng.shuffle(tail)
    return f"{SEPARATOR} ".join(t for t in head + tail if t)


class ShuffledTags(Dataset):
    """A training dataset whose prompts have their tags shuffled per draw; text embeddings are dropped from the
    items (the trainer then encodes the shuffled prompts)."""

    def __init__(self, dataset: Dataset, keep: int, trigger: str | None):
        self.dataset, self.keep, self.trigger = dataset, keep, trigger

    @property
    def rng(self):  # the dataset's own augmentation RNG (saved in checkpoints)
        return getattr(self.dataset, "rng", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        item = dict(self.dataset[key])
        rng = random.Random(key[1] * 2 + 1) if isinstance(key, tuple) else self.rng or random.Random(0)
        item["prompt"] = shuffle_tags(item["prompt"], self.keep, rng, self.trigger)
        item.pop("hidden", None)
        item.pop("pooled", None)
        return item


def with_caption_rules(dataset: Dataset, cfg) -> Dataset:
    """The dataset as training draws it under the data section's caption rules (`shuffle_tags`)."""
    if not getattr(cfg, "shuffle_tags", False):
        return dataset
    return ShuffledTags(dataset, cfg.keep_tags, cfg.trigger_word)
