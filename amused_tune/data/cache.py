"""The token and text-embedding cache: encode the data once, train from disk.

Layout, under `data.cache_dir` (default $AMUSED_TUNE_CACHE, else $XDG_CACHE_HOME/amused-tune or
~/.cache/amused-tune), shared by every run over the same data:

  tokens-<fingerprint>/shard-00000.safetensors ...   VQ tokens [n, V, h, w] + micro_conds [n, V, 5] of 256 listed
                                                     samples each, with their captions and bad samples
  text-<fingerprint>/shard-00000.safetensors ...     hidden [m, 77, D] + pooled [m, P] of 256 distinct prompts each
                                                     (the empty prompt included)

Every key covers exactly what its folder holds, and is made in one place each (`token_key`, `text_key`). The
tokens' covers the data (file names, sizes and mtimes, or the Hub dataset's fingerprint and files), every resolved
data setting except the few `NOT_IN_TOKEN_KEY` lists with the reason (so a new preprocessing key is in the key
unless someone says why not), the resolution and the VQ model (class, config and a sample of every weight); the
text's covers the finished prompts (prefix and template applied), the text encoder and the tokenizer.
Anything else changed means a new folder, never a stale cache.

Several runs may share a folder at once: one encodes under the folder's lock while the others wait, then read.
Each shard is written aside, synced to disk and renamed, so an interrupted encoding resumes at the first missing
shard; a shard that cannot be read (a crash before the rename was durable, a full disk) is encoded again, and
temporary files left by a killed run are removed. Encoding streams: it holds one encode batch of pixels at a time.

Each image's recoloured copies (`data.colour_variants`, amused_tune.data.augment) follow it as samples of their own,
with their own captions. V variants per image: every flip (random_flip: unflipped and flipped) of every crop (the centre crop, or
`data.random_crops` random crops drawn from the sample's name, so the same crops come back on every run).
Training picks one variant per access.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from dataclasses import fields
from pathlib import Path

try:
    import fcntl
except ImportError:  # no POSIX file locks (Windows): runs sharing a cache folder at once may both encode
    fcntl = None

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from amused_tune.data.augment import colour_copies
from amused_tune.data.checks import Report, bad_sample, check_lengths, checked_samples, finish, min_image_size
from amused_tune.data.pixel_art import parse_colour
from amused_tune.data.preprocess import item_draws, make_prompt, preprocess
from amused_tune.data.sources import Record, Source, open_source
from amused_tune.memory.estimate import CACHE_TEXT_BATCH, cache_batches
from amused_tune.model.bases import Components, encode_images, encode_prompts
from amused_tune.recipe import DataConfig
from amused_tune.writes import TMP_PREFIX, write_with

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # bump when what a shard holds, or what its key covers, changes
SHARD = 256

# The data settings the token cache's key leaves out, each with why it changes no pixel and no stored caption.
# Every other setting of DataConfig is in the key (tests/test_cache.py checks both halves).
NOT_IN_TOKEN_KEY = {
    "card": "resolved into the other settings before the key is made",
    "source": "the kind of source it resolved to (folder: imagefolder or captionfolder) is in the key",
    "path": "the source's identity covers the files themselves (names, sizes, mtimes): a moved folder keeps its cache",
    "prompt_prefix": "applied to the captions after the cache; the text cache's key covers the finished prompts",
    "prompt_template": "applied to the captions after the cache; the text cache's key covers the finished prompts",
    "cache": "whether to cache, not what",
    "cache_dir": "where the cache is, not what it holds",
    "num_workers": "how fast training reads, not what",
    "on_bad_sample": "what a bad sample does to the run; every shard records its bad samples either way",
    "trigger_word": "applied to the captions after the cache, as prompt_prefix; the text cache's key covers it",
    "shuffle_tags": "a per-draw change of the finished prompt, made while training; tokens do not depend on it",
    "keep_tags": "a per-draw change of the finished prompt, made while training; tokens do not depend on it",
    "caption_dropout": "drawn per sample while training, never cached",
    "sources": "a list of sources is cached source by source, each under its own key",
}


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("AMUSED_TUNE_CACHE"):
        return Path(os.environ["AMUSED_TUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "amused-tune"


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_digest(module: torch.nn.Module) -> str:
    """Class, config (minus names and versions) and 256 strided values of every weight, in its dtype."""
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}
    h = hashlib.sha256(digest(type(module).__name__, config).encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    return digest(type(tokenizer).__name__, tokenizer.model_max_length, sorted(tokenizer.get_vocab().items()))


def save_atomic(tensors: dict, meta: dict, path: Path) -> None:
    """Write aside, sync the bytes to disk, rename into place: a crash leaves the shard whole or absent (at worst a
    temporary file, which `locked` removes); a failed write is a WriteError naming the shard."""
    write_with(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                           metadata={"meta": json.dumps(meta)}), "a cache shard")


def read_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def readable(path: Path) -> bool:
    """Whether a shard exists and reads (header, every tensor's extent, its meta); a bad one is removed."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            json.loads(f.metadata()["meta"])
            for name in f.keys():
                f.get_slice(name).get_shape()
        return True
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        log.warning("cache: %s cannot be read (%s): encoding it again", path, err)
        path.unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def locked(folder: Path):
    """Hold `folder`'s lock: one run encodes into it while the others wait. Temporary files in it then belong to
    no live writer (a killed run's): they are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("cache: another run is encoding into %s: waiting for it", folder)
                fcntl.flock(handle, fcntl.LOCK_EX)
        for orphan in [*folder.glob(f"{TMP_PREFIX}*"), *folder.glob(".*.tmp*")]:  # (the second: older kits' names)
            orphan.unlink(missing_ok=True)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- VQ tokens


def variants(key: str, cfg: DataConfig) -> list[tuple[random.Random | None, bool]]:
    """(crop rng or None for the centre, flip) of every cached variant of one sample, in a fixed order. The crops
    are drawn from the sample's file name, so a moved dataset gets the same ones."""
    crops = 1 if cfg.center_crop else cfg.random_crops
    flips = (False, True) if cfg.random_flip else (False,)
    seeds = [int(hashlib.sha256(f"{Path(key).name}#{k}".encode()).hexdigest()[:16], 16) for k in range(crops)]
    return [(None if cfg.center_crop else random.Random(seed), flip) for seed in seeds for flip in flips]


def encode_shard(source: Source, records: list[Record], cfg: DataConfig, resolution: int, min_size: int,
                 comps: Components, progress) -> tuple[dict, dict]:
    """Validate and encode one shard of samples: (tensors, meta with keys, captions, bad and conversions).

    Streams: pixels are encoded as soon as an encode batch is full, so memory holds one batch of pixels (and one
    decoded image), not the shard's."""
    report = Report()
    background = parse_colour(cfg.background)
    micro, keys, captions, tokens, pending = [], [], [], [], []
    dtype = torch.int16 if comps.vqvae.config.num_vq_embeddings <= 32767 else torch.int32
    batch = cache_batches(resolution)[0]  # few at a time: building the cache holds less than a training step

    def encode_pending():
        if pending:
            tokens.append(encode_images(comps.vqvae, torch.stack(pending)).cpu().to(dtype))
            pending.clear()

    for record, caption, image, grid in checked_samples(source, records, cfg, min_size, report, progress=progress):
        for suffix, picture, text in colour_copies(image, caption, record.key, cfg):  # the image, then its recolourings
            keys.append(record.key + suffix)
            captions.append(text)
            for rng, flip in variants(record.key, cfg):
                px, mc = preprocess(picture, resolution, rng, flip, grid, background)
                pending.append(px)
                micro.append(mc)
                if len(pending) == batch:
                    encode_pending()
    encode_pending()
    n_var = len(variants("", cfg))
    side = resolution // comps.vae_scale
    tensors = {
        "tokens": (torch.cat(tokens) if tokens else torch.zeros(0, side, side, dtype=dtype)).reshape(-1, n_var, side, side),
        "micro_conds": (torch.stack(micro) if micro else torch.zeros(0, 5)).reshape(-1, n_var, 5),
    }
    meta = {"keys": keys, "captions": captions, "bad": report.bad, "converted": dict(report.converted),
            "pixel_art": {"grids": dict(report.pixel_grids), "colours": dict(report.colours)}}
    return tensors, meta


def token_key(cfg: DataConfig, source: Source, resolution: int, vqvae: torch.nn.Module) -> str:
    """The token cache's key, the one place it is made: the source's identity, the resolution, every resolved data
    setting but those `NOT_IN_TOKEN_KEY` names (settings with no effect are normalised away), the VQ model."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_IN_TOKEN_KEY}
    if cfg.center_crop:  # one centre crop, whatever random_crops says
        settings["random_crops"] = None
    if cfg.prompt is not None:  # the prompt replaces every caption: the column is not read
        settings["caption_column"] = None
    if not cfg.colour_variants:  # no recoloured copies: the vocabulary is not used
        settings["colours"] = None
    return digest(CACHE_VERSION, source.kind, source.identity, resolution, min_image_size(cfg, resolution), settings,
                  model_digest(vqvae))


def text_key(prompts: list[str], text_encoder: torch.nn.Module, tokenizer) -> str:
    """The text cache's key: the finished prompts, the text encoder (in its dtype) and the tokenizer."""
    return digest(CACHE_VERSION, prompts, model_digest(text_encoder), tokenizer_digest(tokenizer))


def token_cache(source: Source, cfg: DataConfig, resolution: int, comps: Components,
                show_progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[str], Report]:
    """Tokens [N, V, h, w], micro_conds [N, V, 5] and captions of the usable samples, encoding missing shards."""
    min_size = min_image_size(cfg, resolution)
    folder = cache_root(cfg) / f"tokens-{token_key(cfg, source, resolution, comps.vqvae)}"
    shards = [folder / f"shard-{i:05d}.safetensors" for i in range(-(-len(source.records) // SHARD))]
    report = Report(total=len(source.records))
    with locked(folder):  # another run encoding the same data: wait for it, then read what it wrote
        todo = [i for i, path in enumerate(shards) if not readable(path)]
        if cfg.on_bad_sample == "error":  # a skip-mode cache may hold bad samples: stop on them as a fresh run would
            for i, path in enumerate(shards):
                if i not in todo and read_meta(path)["bad"]:
                    bad_sample(report, cfg, *read_meta(path)["bad"][0])
        if todo:
            count = sum(len(source.records[i * SHARD : (i + 1) * SHARD]) for i in todo)
            log.info("data: encoding %d images to VQ tokens into %s", count, folder)
            with tqdm(total=count, desc="cache: VQ tokens", disable=not show_progress, dynamic_ncols=True) as bar:
                for i in todo:
                    tensors, meta = encode_shard(source, source.records[i * SHARD : (i + 1) * SHARD], cfg,
                                                 resolution, min_size, comps, bar)
                    save_atomic(tensors, meta, shards[i])
    tokens, micro, captions = [], [], []
    for path in shards:
        data, meta = load_file(str(path)), read_meta(path)
        tokens.append(data["tokens"])
        micro.append(data["micro_conds"])
        captions += meta["captions"]
        report.bad += [tuple(b) for b in meta["bad"]]
        report.converted.update(meta["converted"])
        report.pixel_grids.update(meta["pixel_art"]["grids"])
        report.colours.update(meta["pixel_art"]["colours"])
    finish(report, cfg, len(captions))
    report.copies = len(captions) - (report.total - len(report.bad))
    return torch.cat(tokens), torch.cat(micro), captions, report


# --------------------------------------------------------------------------------------------- text


class TextStore:
    """Cached (hidden, pooled) of distinct prompts, read lazily from the shards (memory-mapped)."""

    def __init__(self, folder: Path, prompts: list[str]):
        self.folder = folder
        self.row = {p: i for i, p in enumerate(prompts)}
        self._files: dict[int, object] = {}

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_files": {}}

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        shard, row = divmod(self.row[prompt], SHARD)
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / f"shard-{shard:05d}.safetensors"), "pt")
        f = self._files[shard]
        return f.get_slice("hidden")[row : row + 1][0], f.get_slice("pooled")[row : row + 1][0]


def text_cache(prompts: list[str], cfg: DataConfig, comps: Components, show_progress: bool) -> TextStore:
    """Encode the distinct prompts (and the empty one) not cached yet; returns the store."""
    unique = sorted(set(prompts) | {""})
    folder = cache_root(cfg) / f"text-{text_key(unique, comps.text_encoder, comps.tokenizer)}"
    with locked(folder):
        _encode_text(folder, unique, comps, show_progress)
    return TextStore(folder, unique)


def _encode_text(folder: Path, unique: list[str], comps: Components, show_progress: bool) -> None:
    todo = [i for i in range(-(-len(unique) // SHARD)) if not readable(folder / f"shard-{i:05d}.safetensors")]
    count = sum(len(unique[i * SHARD : (i + 1) * SHARD]) for i in todo)
    with tqdm(total=count, desc="cache: text", disable=not show_progress or not todo, dynamic_ncols=True) as bar:
        for i in todo:
            chunk = unique[i * SHARD : (i + 1) * SHARD]
            parts = [encode_prompts(comps.text_encoder, comps.tokenizer, chunk[j : j + CACHE_TEXT_BATCH])
                     for j in range(0, len(chunk), CACHE_TEXT_BATCH)]
            hidden = torch.cat([h for h, _ in parts]).cpu()
            pooled = torch.cat([p for _, p in parts]).cpu()
            save_atomic({"hidden": hidden, "pooled": pooled}, {"prompts": chunk},
                        folder / f"shard-{i:05d}.safetensors")
            bar.update(len(chunk))


# --------------------------------------------------------------------------------------------- dataset


class CachedDataset(Dataset):
    """Items from the cache: one of each sample's V token variants (drawn per access), its prompt and, unless
    the text encoder trains, its cached text embeddings."""

    def __init__(self, tokens: torch.Tensor, micro: torch.Tensor, prompts: list[str], text: TextStore | None,
                 seed: int = 0):
        self.tokens, self.micro, self.prompts, self.text = tokens, micro, prompts, text
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, rng = item_draws(key, self.rng)
        v = rng.randrange(self.tokens.shape[1])
        item = {"tokens": self.tokens[index, v].long(), "micro_conds": self.micro[index, v],
                "prompt": self.prompts[index]}
        if self.text is not None:
            item["hidden"], item["pooled"] = self.text.get(item["prompt"])
        return item


def cached_dataset(cfg: DataConfig, resolution: int, comps: Components, train_text: bool = False, seed: int = 0,
                   show_progress: bool = True, source: Source | None = None
                   ) -> tuple[CachedDataset, tuple[torch.Tensor, torch.Tensor], Report]:
    """The dataset of a resolved data section from the cache (filling it first); returns (dataset, the empty
    prompt's (hidden [1, 77, D], pooled [1, P]), validation report). With `train_text` only tokens are cached.
    `source`: the section's listing when the preflight made it."""
    source = source or open_source(cfg)
    tokens, micro, captions, report = token_cache(source, cfg, resolution, comps, show_progress)
    prompts = [make_prompt(cfg, c) for c in captions]
    check_lengths(sorted(set(prompts)), comps.tokenizer, report)
    if train_text:  # the encoder learns: its embeddings change every step and cannot be cached
        store, empty = None, encode_prompts(comps.text_encoder, comps.tokenizer, [""])
    else:
        store = text_cache(prompts, cfg, comps, show_progress)
        hidden, pooled = store.get("")
        empty = (hidden[None], pooled[None])
    log.info("data: %d samples x %d variants from the cache in %s", len(prompts), tokens.shape[1], cache_root(cfg))
    return CachedDataset(tokens, micro, prompts, store, seed), empty, report
