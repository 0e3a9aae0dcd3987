"""Data sources: list the samples of a data section without decoding them.

Four sources: `hub` (a Hub dataset or one saved with `save_to_disk`), `imagefolder` (images + metadata.jsonl),
`captionfolder` (images + same-named .txt captions) and `single_image` (one file and `data.prompt`); `folder` is
imagefolder when the folder holds a metadata.jsonl, else captionfolder. A source's `identity` names its content
(file names, sizes and mtimes, or the Hub dataset's fingerprint) for the cache.

`data.prompt` set for a folder or Hub source replaces the captions of every image: when the images have captions
of their own, that is said once (a warning naming how many captions are set aside), never done silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amused_tune.common import kit_roots
from amused_tune.data.cards import DataError
from amused_tune.recipe import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def resolve_path(path: str) -> Path:
    """A relative path is tried from the working directory, then from the kit's folders (where cards point)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    for root in kit_roots():
        if (root / p).exists():
            return root / p
    return p


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
    meta = root / "metadata.jsonl"  # there: source_problem refuses an imagefolder without one
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

    from amused_tune.model.bases import hub_unreachable

    local = resolve_path(cfg.path)
    saved = (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
    unreachable = None if saved or local.exists() else hub_unreachable()
    try:
        if saved:
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"data.split={cfg.split}: {cfg.path} has splits {', '.join(ds)}")
                ds = ds[cfg.split]
        elif unreachable:  # only the cache can help: ask it alone instead of retrying the network for ~30 s
            with _offline(datasets):
                ds = datasets.load_dataset(cfg.path, split=cfg.split)
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else cfg.path, split=cfg.split)
    except DataError:
        raise
    except Exception as err:  # offline and not cached, no such dataset or split, gated...
        if unreachable:
            raise DataError(f"data.path={cfg.path}: the Hub at {unreachable} cannot be reached and the dataset is "
                            "not in the cache: check the network or HF_ENDPOINT, or pass a local folder as data.path"
                            ) from None
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


@contextlib.contextmanager
def _offline(datasets):
    """Hub lookups answered from the local cache only, for the duration."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def open_source(cfg: DataConfig) -> Source:
    """List the samples of the (resolved) data section; nothing is decoded yet."""
    source = _hub(cfg) if cfg.source == "hub" else _local(cfg)
    if cfg.prompt and source.kind != "single_image":
        own = sum(1 for r in source.records if r.caption and r.caption.strip())
        if own:
            log.warning("data: data.prompt=%r replaces the own captions of %d images in %s (unset data.prompt, "
                        "e.g. --data.prompt=null, to train on them)", cfg.prompt, own, cfg.path)
    return source


def _local(cfg: DataConfig) -> Source:
    path = resolve_path(cfg.path)
    problem = source_problem(cfg, path)
    if problem:
        raise DataError(problem)
    if cfg.source == "single_image":
        return Source("single_image", [Record(str(path), path, cfg.prompt)], [_stat(path, path.parent)])
    if cfg.source == "imagefolder" or (cfg.source == "folder" and (path / "metadata.jsonl").is_file()):
        return _imagefolder(path, cfg)
    return _captionfolder(path, cfg)


# --------------------------------------------------------------------------------------------- which source fits


@dataclass(frozen=True)
class Layout:
    """What a local data.path holds, as the facts the sources' rules read (nothing is decoded)."""

    exists: bool
    is_file: bool = False
    image_file: bool = False  # a file with an image suffix
    saved_dataset: bool = False  # a folder written by datasets' save_to_disk
    metadata: bool = False  # a folder with a metadata.jsonl (imagefolder's captions)
    txt_captions: bool = False  # a folder with .txt files (captionfolder's captions)


def layout(path: Path) -> Layout:
    """The facts about `path` that say which source reads it."""
    if not path.exists():
        return Layout(exists=False)
    if path.is_file():
        return Layout(exists=True, is_file=True, image_file=path.suffix.lower() in IMAGE_SUFFIXES)
    return Layout(exists=True,
                  saved_dataset=(path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file(),
                  metadata=(path / "metadata.jsonl").is_file(), txt_captions=next(path.rglob("*.txt"), None) is not None)


def fitting_source(facts: Layout) -> str:
    """The data.source that reads a path with these facts, as a hint ("--data.source=... (why)"), or ""."""
    if facts.is_file:
        return '--data.source=single_image --data.prompt="its caption" (one image)' if facts.image_file else ""
    if facts.saved_dataset:
        return "--data.source=hub (a dataset saved with save_to_disk)"
    if facts.metadata:
        return "--data.source=folder (it has a metadata.jsonl; imagefolder reads it too)"
    if facts.txt_captions:
        return "--data.source=folder (it has .txt captions; captionfolder reads them too)"
    return ""


def source_problem(cfg: DataConfig, path: Path) -> str | None:
    """Why the (resolved) local data section cannot be read at `path` (its data.path resolved): a missing path, a
    file for a folder source, a folder for single_image, a folder without the captions its source reads; the
    message names the source that fits. None when the source can list it (hub sources are checked on loading)."""
    source, shown = cfg.source, cfg.path
    if source == "hub":
        return None
    if not str(shown).strip():
        return "data.path is empty: set it to your images (a folder, or one image for data.source=single_image)"
    facts = layout(path)
    if not facts.exists:
        return (f"data.path={shown} does not exist: set data.path in the recipe to your images (a folder, or one "
                "image for data.source=single_image), or pass --data.path=...")
    fits = fitting_source(facts)
    hint = f": use {fits}" if fits else ""
    if source == "single_image":
        if not facts.is_file:
            return (f"data.path={shown} is a folder, but data.source=single_image needs one image file"
                    f"{hint or ': for a folder of captioned images use --data.source=folder (a .txt per image, or a metadata.jsonl)'}")
        if not cfg.prompt:
            return "data.source=single_image needs data.prompt, e.g. 'A mushroom in [V] style'"
        return None
    if facts.is_file:
        return f"data.path={shown} is a file, but data.source={source} needs a folder{hint or ': pass a folder'}"
    if source == "imagefolder" and not facts.metadata:
        add = ': add one ({"file_name": ..., "text": ...} per line) or use data.source=captionfolder with a .txt per image'
        return f"data.path={shown} has no metadata.jsonl, which data.source=imagefolder reads{hint or add}"
    if source == "captionfolder" and not facts.txt_captions and not cfg.prompt:
        add = ": add a same-named .txt per image, or set data.prompt to caption every image alike"
        return f"data.path={shown} has no .txt captions, which data.source=captionfolder reads{hint or add}"
    return None
