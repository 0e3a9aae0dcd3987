"""Several data sources in one run (`data.sources`): each source is resolved against its card like a single data
section, validated and cached on its own (once, whatever its repeats), and the run trains on their mixture.

An epoch of the mixture holds every image of source k `repeats_k` times, so with 20 subject images x 10 repeats
and 200 regularization images x 1, half the draws are subject images. The data order stays a function of the seed
and the number of samples consumed (train.setup.EpochSampler), so resume is exact.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from amused_tune.data.pixel_art import merge_reports
from amused_tune.recipe import DataConfig


class Mixture(Dataset):
    """The sources' datasets, source k's items `repeats[k]` times each; items carry their source's index."""

    def __init__(self, parts: list[Dataset], repeats: list[int]):
        self.parts = parts
        self.index = [(k, i) for k, (ds, r) in enumerate(zip(parts, repeats)) for _ in range(r) for i in range(len(ds))]

    @property
    def rng(self):  # the first source's augmentation RNG (plain-index access; the trainer draws by seed)
        return getattr(self.parts[0], "rng", None)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        k, i = self.index[index]
        item = dict(self.parts[k][(i, seed) if seed is not None else i])
        item["source"] = k
        return item


def mixture_report(reports: list[dict], parts: list[tuple[DataConfig, int]]) -> dict:
    """data_report.json of a mixture: the totals and each source's report with its path and repeats."""
    total = {key: sum(r[key] for r in reports) for key in ("samples", "used", "skipped", "recoloured_copies")}
    sources = [{"card": cfg.card, "source": cfg.source, "path": cfg.path, "repeats": repeats, **report}
               for report, (cfg, repeats) in zip(reports, parts)]
    return {**total, "bad": [b for r in reports for b in r["bad"]],
            "pixel_art": merge_reports([r["pixel_art"] for r in reports]), "sources": sources}
