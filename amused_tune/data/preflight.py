"""The data preflight: a recipe's data section resolved once, before any model loads, and handed down.

`preflight(data)` merges each source over its dataset card (one source, or every entry of `data.sources` with its
repeats), checks that every local source can read its data.path (sources.source_problem) and lists the samples of
the local sources (nothing decoded). The `DataPlan` it returns is what the command checks, what
`validation_prompts` reads the captions from, and what the trainer opens and caches (data.datasets), so the path,
the source and the card are resolved in this one place. Hub sources are listed when the trainer loads them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from amused_tune.data.cards import OWN_KEYS, DataError, resolve_config
from amused_tune.data.sources import Source, open_source, resolve_path, source_problem
from amused_tune.recipe import DataConfig, ValidationConfig


@dataclass
class Part:
    """One resolved source of the run, how often it is drawn per epoch, and its listing once it is made."""

    cfg: DataConfig
    repeats: int = 1
    listed: Source | None = None

    def source(self) -> Source:
        """The source's samples, listed on first use (a Hub dataset is loaded here), then kept."""
        if self.listed is None:
            self.listed = open_source(self.cfg)
        return self.listed


@dataclass
class DataPlan:
    """The data of a run, resolved and checked: its parts (one per source; one for a single data section)."""

    parts: list[Part]
    mixture: bool = False  # data.sources: the parts are its entries

    def captions(self) -> list[str]:
        """The captions of a single local folder source (data.prompt when set), stripped; [] for a Hub dataset, a
        single image or several sources."""
        if self.mixture or self.parts[0].cfg.source in ("hub", "single_image"):
            return []
        part = self.parts[0]
        if part.cfg.prompt:
            return [part.cfg.prompt]
        return [r.caption.strip() for r in part.source().records if r.caption and r.caption.strip()]


def part_configs(data: DataConfig) -> list[tuple[DataConfig, int]]:
    """(resolved data section, repeats) of every source; a single-source section is one part with repeats 1."""
    if not data.sources:
        return [(resolve_config(data), 1)]
    parts = []
    for spec in data.sources:
        own = {k: getattr(spec, k) for k in OWN_KEYS}
        parts.append((resolve_config(dataclasses.replace(data, sources=[], **own)), spec.repeats))
    return parts


def preflight(data: DataConfig) -> DataPlan:
    """Resolve every source against its card, check its data.path and list the local ones; raises DataError with
    the one line that says what to fix (the first source with a problem)."""
    parts = [Part(cfg, repeats) for cfg, repeats in part_configs(data)]
    for part in parts:
        problem = source_problem(part.cfg, resolve_path(part.cfg.path))
        if problem:
            raise DataError(problem)
        if part.cfg.source != "hub":
            part.source()
    return DataPlan(parts, mixture=bool(data.sources))


SMALL_WORDS = {"a", "an", "the", "in", "on", "of", "with", "and", "at", "by", "to", "for", "from"}


def validation_prompts(plan: DataPlan, validation: ValidationConfig) -> tuple[list[str], list[str]]:
    """(the validation prompts, the lines to say). Without prompts, `validation.from_data` asks for the first N
    distinct captions of the data; words of the prompts that no caption contains (a trigger word the grid will
    never show) are warned about. "warning: ..." lines come first."""
    prompts = [validation.prompts] if isinstance(validation.prompts, str) else list(validation.prompts)
    captions = plan.captions() if (validation.from_data or prompts) else []
    said = []
    if not prompts and validation.from_data and captions:
        prompts = list(dict.fromkeys(captions))[:validation.from_data]
        said.append(f"validation: no prompts given: the data's first caption{'s' if len(prompts) > 1 else ''}, "
                    + "; ".join(f"`{p}`" for p in prompts))
    words = re.compile(r"\[[^\]]*\]|[\w'-]+")
    known = {w.lower() for c in captions for w in words.findall(c)}
    for prompt in prompts if captions else []:
        unseen = [w for w in dict.fromkeys(words.findall(prompt)) if w.lower() not in known | SMALL_WORDS]
        if unseen:
            said.insert(0, f"warning: validation prompt `{prompt}` uses {', '.join(unseen)}, which no caption of "
                           f"data.path={plan.parts[0].cfg.path} contains: the grids will not show what the run "
                           f"learns for {'them' if len(unseen) > 1 else 'it'} (put the same words in the captions, "
                           "or change validation.prompts)")
    return prompts, said
