"""Training data: dataset cards, sources, validation of every sample, preprocessing and micro-conditioning.

Top to bottom: `resolve_config` merges the recipe's data section over its dataset card; `open_source` lists the
samples of one of four sources (hub, imagefolder, captionfolder, single_image) without decoding them;
`load_image` decodes and validates one sample (converting grayscale, palette, RGBA, CMYK and 16-bit images
to RGB, refusing unreadable, truncated, non-image and too-small files); `preprocess` resizes, crops and flips;
`prepare_training_data` is what the trainer calls: it validates every sample before training and returns
either a dataset of pixels (`data.cache: false`) or one of cached VQ tokens and text embeddings (amused_tune.cache).

A dataset item is a dict:
  pixels       float [3, R, R] in [0, 1]  (R = the model's resolution)          (cache off)
  tokens       long [h, w] VQ token ids; hidden [77, D], pooled [P]           (cache on; hidden/pooled absent
                                                                                when the text encoder trains)
  prompt       str
  micro_conds  float [5]: [orig_width, orig_height, crop_top, crop_left, aesthetic score 6]
"""

from __future__ import annotations

import collections
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from amused_tune.models import encode_prompts, micro_conditioning
from amused_tune.cards import KIT_ROOT, DataError, load_card, resolve_config  # noqa: F401 (re-exported)
from amused_tune.recipe import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadSample(Exception):
    """One sample that cannot be used; the message is the reason."""


def resolve_path(path: str) -> Path:
    """A relative path is tried from the working directory, then from the kit's folder (where cards point)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute() or not (KIT_ROOT / p).exists():
        return p
    return KIT_ROOT / p


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Record:
    """One sample before decoding: `key` names it in messages, `ref` is its file (or Hub row), caption or None."""

    key: str
    ref: Any
    caption: str | None
    problem: str | None = None  # known bad before decoding (e.g. a corrupt metadata line)


@dataclass
class Source:
    """The listed samples of a data source and what identifies its content (for the cache's fingerprint)."""

    kind: str
    records: list[Record]
    identity: list = field(default_factory=list)
    hub: Any = None  # datasets.Dataset for kind=hub (image column not decoded)
    image_column: str = "image"


def _stat(path: Path, root: Path) -> list:
    st = path.stat()
    return [str(path.relative_to(root)), st.st_size, st.st_mtime_ns]


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _imagefolder(root: Path, cfg: DataConfig) -> Source:
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"data.path={cfg.path}: no metadata.jsonl in this folder (or use data.source=captionfolder)")
    records, listed = [], set()
    for line_no, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            records.append(Record(f"{meta}:{line_no}", None, None, "not a JSON object with a file_name key"))
            continue
        caption = row.get(cfg.caption_column)
        listed.add(str(Path(name)))
        records.append(Record(str(root / name), root / name, None if caption is None else str(caption)))
    images = _images_under(root)
    for path in images:  # images the metadata forgot: they have no caption
        if str(path.relative_to(root)) not in listed:
            records.append(Record(str(path), path, None))
    return Source("imagefolder", records, [_stat(meta, root)] + [_stat(p, root) for p in images])


def _captionfolder(root: Path, cfg: DataConfig) -> Source:
    records, identity = [], []
    for path in _images_under(root):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        records.append(Record(str(path), path, caption))
        identity += [_stat(path, root)] + ([_stat(txt, root)] if txt.is_file() else [])
    return Source("captionfolder", records, identity)


def _hub(cfg: DataConfig) -> Source:
    import datasets

    local = resolve_path(cfg.path)
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"data.split={cfg.split}: {cfg.path} has splits {', '.join(ds)}")
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else cfg.path, split=cfg.split)
    except DataError:
        raise
    except Exception as err:  # offline and not cached, no such dataset or split, gated...
        raise DataError(f"data.path={cfg.path}: could not load the dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err
    for key in ("image_column", "caption_column"):
        if getattr(cfg, key) not in ds.column_names and not (key == "caption_column" and cfg.prompt):
            raise DataError(f"data.{key}={getattr(cfg, key)}: {cfg.path} has columns {', '.join(ds.column_names)}")
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # decode ourselves: bad images survive
    captions = ds[cfg.caption_column] if cfg.caption_column in ds.column_names else [None] * len(ds)
    records = [Record(f"{cfg.path}[{cfg.split}][{i}]", i, None if c is None else str(c))
               for i, c in enumerate(captions)]
    identity = [ds._fingerprint, cfg.split, cfg.image_column, cfg.caption_column, len(ds)]
    for f in ds.cache_files:
        p = Path(f["filename"])
        identity.append([p.name, p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else p.name)
    return Source("hub", records, identity, hub=ds, image_column=cfg.image_column)


def open_source(cfg: DataConfig) -> Source:
    """List the samples of the (resolved) data section; nothing is decoded yet."""
    if cfg.source == "hub":
        return _hub(cfg)
    path = resolve_path(cfg.path)
    if not path.exists():
        raise DataError(f"data.path={cfg.path} does not exist")
    if cfg.source == "single_image":
        if not cfg.prompt:
            raise DataError("data.source=single_image needs data.prompt, e.g. 'A mushroom in [V] style'")
        return Source("single_image", [Record(str(path), path, cfg.prompt)], [_stat(path, path.parent)])
    if not path.is_dir():
        raise DataError(f"data.path={cfg.path}: data.source={cfg.source} needs a folder")
    return _imagefolder(path, cfg) if cfg.source == "imagefolder" else _captionfolder(path, cfg)


# --------------------------------------------------------------------------------------------- one sample


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB from any mode; returns (image, what was converted or None). Transparency is laid over white;
    16-bit values are scaled to 8 bits (PIL's own convert would clip them)."""
    mode, kind = image.mode, None
    if mode == "RGB":
        return image, None
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else (1.0 if arr.max() <= 1 and mode == "F" else 255.0)
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), "L")
        kind = "16-bit" if mode.startswith("I") else "float"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        kind = kind or f"{mode} (transparency over white)"
    return image.convert("RGB"), kind or {"1": "1-bit", "L": "grayscale", "P": "palette"}.get(mode, mode)


def load_image(source: Source, record: Record, min_size: int) -> tuple[Image.Image, str | None]:
    """Decode and check one sample; raises BadSample with the reason. Returns (RGB image, conversion or None)."""
    if record.problem:
        raise BadSample(record.problem)
    try:
        if source.kind == "hub":
            value = source.hub[record.ref][source.image_column]
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if value is None:
                raise BadSample("no image in this row")
            if isinstance(value, (bytes, bytearray)):
                import io

                value = io.BytesIO(value)
            image = value if isinstance(value, Image.Image) else Image.open(value)
        else:
            image = Image.open(record.ref)
        image.load()  # a truncated file fails here, not mid-run
        image = ImageOps.exif_transpose(image)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("file not found") from None
    except Image.UnidentifiedImageError:
        raise BadSample("not an image (unreadable or another file type)") from None
    except Exception as err:  # truncated, corrupt, decompression bomb, ...
        raise BadSample(f"unreadable image ({type(err).__name__}: {err})") from None
    w, h = image.size
    if min(w, h) < min_size:
        raise BadSample(f"too small: {w}x{h} px is smaller than {min_size} px (data.min_image_size=0 upscales it)")
    return to_rgb(image)


def check_caption(record: Record, cfg: DataConfig) -> str:
    """The caption of a sample (data.prompt when set); raises BadSample if it is missing or empty."""
    caption = cfg.prompt or record.caption
    if caption is None:
        raise BadSample("no caption")
    if not caption.strip():
        raise BadSample("empty caption")
    return caption.strip()


def make_prompt(cfg: DataConfig, caption: str) -> str:
    return cfg.prompt_prefix + cfg.prompt_template.replace("{caption}", caption)


def crop_origin(width: int, height: int, resolution: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop top, crop left): short side to `resolution`, centre crop if no rng."""
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if rng is None:
        return new_w, new_h, (new_h - resolution) // 2, (new_w - resolution) // 2
    return new_w, new_h, rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)


def preprocess(image: Image.Image, resolution: int, rng: random.Random | None = None,
               flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the short side to `resolution`, crop a square (centre, or random from `rng`), optionally flip.

    Returns (pixels [3, R, R] in [0, 1], micro_conds [5]): the image's true original size and the crop's top-left
    in the resized image, as aMUSEd was trained; a flipped crop reports its left edge in the flipped image.
    """
    orig_w, orig_h = image.size
    new_w, new_h, top, left = crop_origin(orig_w, orig_h, resolution, rng)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - resolution - left
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return pixels, micro_conditioning(orig_w, orig_h, top, left)


# --------------------------------------------------------------------------------------------- validation


@dataclass
class Report:
    """What validation found: bad samples (key, reason), conversions by kind, captions cut to 77 tokens."""

    total: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    converted: collections.Counter = field(default_factory=collections.Counter)
    truncated: list[str] = field(default_factory=list)

    def log(self, listed_in: Path | None = None) -> None:
        if self.converted:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.converted.items()))
            log.warning("data: converted %d images to RGB (%s)", sum(self.converted.values()), kinds)
        if self.truncated:
            log.warning("data: %d captions are longer than 77 tokens and were truncated, e.g. %r",
                        len(self.truncated), self.truncated[0][:120])
        if self.bad:
            reasons = collections.Counter(re.split(r"[:(]", reason)[0].strip() for _, reason in self.bad)
            log.warning("data: skipped %d of %d samples (%s); first: %s: %s%s", len(self.bad), self.total,
                        ", ".join(f"{r}: {n}" for r, n in reasons.most_common()), *self.bad[0],
                        f"; all listed in {listed_in}" if listed_in else "")

    def to_dict(self) -> dict:
        return {"samples": self.total, "used": self.total - len(self.bad), "skipped": len(self.bad),
                "bad": [{"sample": k, "reason": r} for k, r in self.bad], "converted": dict(self.converted),
                "truncated_captions": len(self.truncated)}


def bad_sample(report: Report, cfg: DataConfig, key: str, reason: str) -> None:
    """Count a bad sample, or stop (data.on_bad_sample=error) with one line naming it."""
    if cfg.on_bad_sample == "error":
        raise DataError(f"{key}: {reason} (data.on_bad_sample=error; set it to skip to train without it)")
    report.bad.append((key, reason))


def check_lengths(prompts: list[str], tokenizer, report: Report) -> None:
    """Note captions longer than the text encoder's 77 tokens (they are truncated when encoded)."""
    if tokenizer is None or not prompts:
        return
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    report.truncated = [p for p, n in zip(prompts, lengths) if n > limit]


def finish(report: Report, cfg: DataConfig, used: int) -> None:
    if used == 0:
        why = f": {report.bad[0][0]}: {report.bad[0][1]}" if report.bad else ""
        raise DataError(f"data: no usable samples in {cfg.path} ({len(report.bad)} bad{why}): point data.path at "
                        "images with captions (see datasets_cards/ for the layouts)")


# --------------------------------------------------------------------------------------------- datasets


class PixelDataset(Dataset):
    """Validated samples, decoded and preprocessed on access (random crop and flip drawn per access)."""

    def __init__(self, source: Source, samples: list[tuple[Record, str]], resolution: int, cfg: DataConfig,
                 seed: int = 0):
        self.source, self.samples, self.resolution, self.cfg = source, samples, resolution, cfg
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        record, prompt = self.samples[index]
        image, _ = load_image(self.source, record, 0)
        rng = None if self.cfg.center_crop else self.rng
        flip = bool(self.cfg.random_flip) and self.rng.random() < 0.5
        pixels, micro = preprocess(image, self.resolution, rng, flip)
        return {"pixels": pixels, "prompt": prompt, "micro_conds": micro}


def validated_dataset(cfg: DataConfig, resolution: int, tokenizer=None, seed: int = 0) -> tuple[PixelDataset, Report]:
    """Decode and check every sample now (cache off), so that no bad sample is met mid-run."""
    source = open_source(cfg)
    report = Report(total=len(source.records))
    min_size = resolution if cfg.min_image_size is None else cfg.min_image_size
    samples = []
    for record in source.records:
        try:
            caption = check_caption(record, cfg)
            _, converted = load_image(source, record, min_size)
        except BadSample as bad:
            bad_sample(report, cfg, record.key, str(bad))
            continue
        if converted:
            report.converted[converted] += 1
        samples.append((record, make_prompt(cfg, caption)))
    finish(report, cfg, len(samples))
    check_lengths(sorted({p for _, p in samples}), tokenizer, report)
    return PixelDataset(source, samples, resolution, cfg, seed), report


def build_dataset(cfg: DataConfig, resolution: int) -> Dataset:
    """The pixel dataset described by a data section (its card resolved), every sample validated first."""
    dataset, report = validated_dataset(resolve_config(cfg), resolution)
    report.log()
    return dataset


def prepare_training_data(recipe, comps, accelerator) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor]]:
    """What the trainer trains on, and the empty prompt's (hidden [1, 77, D], pooled [1, P]) on the device.

    Every sample is validated here, before the first step. With `data.cache` the images are encoded to VQ tokens
    and the captions to embeddings (resuming an interrupted encoding), then the VQ model, and the text encoder
    unless it trains, are moved to the CPU. Writes OUTPUT_DIR/data_report.json.
    """
    cfg = resolve_config(recipe.data)
    resolution = comps.resolution
    if cfg.cache:
        from amused_tune import cache

        with accelerator.main_process_first():
            dataset, empty, report = cache.cached_dataset(
                cfg, resolution, comps, train_text=recipe.adapter.text_encoder, seed=recipe.train.seed,
                show_progress=accelerator.is_main_process)
        comps.vqvae.to("cpu")
        if not recipe.adapter.text_encoder:
            comps.text_encoder.to("cpu")
        empty = tuple(t.to(accelerator.device) for t in empty)
    else:
        dataset, report = validated_dataset(cfg, resolution, comps.tokenizer, recipe.train.seed)
        empty = encode_prompts(comps.text_encoder, comps.tokenizer, [""])
    path = Path(recipe.output.dir) / "data_report.json"
    if accelerator.is_main_process:
        report.log(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return dataset, empty


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
