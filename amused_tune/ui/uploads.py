"""Images (and their .txt captions) uploaded on the New run tab: checked, then written to RUNS/uploads/NAME/.

Every file is checked before anything is written, and a refusal is one line naming the file and what to fix: a
name with a folder in it (`../x.png`, `/etc/x.png`), a file that is not an image (or not a caption), an image so
large that decoding it would take the machine's memory (a decompression bomb: its header is read, never its
pixels), a folder NAME that is not one plain name inside the runs folder. What passes is written aside and renamed
into place, so a failure leaves the folder as it was. Nothing is written outside the runs folder."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from amused_tune.data.sources import IMAGE_SUFFIXES

UPLOADS = "uploads"  # RUNS/uploads/NAME/: what the page received
MAX_PIXELS = 8192 * 8192  # larger is refused unread (aMUSEd trains at 256 or 512 px)
MAX_CAPTION_BYTES = 64 * 1024
MAX_FILES = 1000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CAPTION_SUFFIXES = (".txt",)
METADATA = "metadata.jsonl"


class UploadError(ValueError):
    """One line: which upload, and what to fix."""


def folder_for(runs: Path, name: str) -> Path:
    """RUNS/uploads/NAME, when NAME is one plain folder name that stays inside the runs folder."""
    name = (name or "").strip()
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise UploadError(f"upload folder name {name!r} must be one plain name (letters, digits, '.', '_', '-'; "
                          "no '/' or '..'), e.g. my_style")
    runs = Path(runs).resolve()
    folder = (runs / UPLOADS / name).resolve()
    if not folder.is_relative_to(runs / UPLOADS):  # e.g. a symlink planted under uploads/
        raise UploadError(f"upload folder {name!r} would be outside the runs folder {runs}: pick another name")
    return folder


def safe_file_name(name: str) -> str:
    """The uploaded file's own name, refused when it holds a folder (`../x.png`, `/abs/x.png`, `a/b.png`)."""
    raw = str(name or "")
    if not raw or raw.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", raw):
        raise UploadError(f"upload {raw!r}: an absolute path is not a file name; upload the file itself")
    if "/" in raw or "\\" in raw or raw in (".", ".."):
        raise UploadError(f"upload {raw!r}: a file name may not hold a folder or '..'; rename the file")
    if raw.startswith("."):
        raise UploadError(f"upload {raw!r}: a hidden file name (starting with '.') is not taken; rename the file")
    return raw


def check_image(path: Path, name: str) -> tuple[int, int]:
    """(width, height) of an image file that decodes; UploadError for anything else, a decompression bomb too."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
                if size[0] * size[1] > MAX_PIXELS:
                    raise UploadError(f"upload {name}: {size[0]}x{size[1]} pixels is more than this page decodes "
                                      f"({MAX_PIXELS // 1_000_000} megapixels, a decompression bomb guard): "
                                      "scale it down first")
                image.verify()
            with Image.open(path) as image:
                image.load()  # verify() checks the structure; load() decodes the pixels (a truncated file fails)
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"upload {name}: too many pixels to decode safely (a decompression bomb): scale it down "
                          "first") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise UploadError(f"upload {name} is not an image PIL can read ({type(err).__name__}): upload a PNG, JPEG "
                          "or WebP file") from None
    return size


def check_text(path: Path, name: str) -> None:
    size = Path(path).stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise UploadError(f"upload {name}: {size} bytes is too long for a caption file (at most "
                          f"{MAX_CAPTION_BYTES // 1024} KiB)")
    try:
        Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError(f"upload {name} is not UTF-8 text: save the caption as plain text") from None


def save_uploads(runs: Path, name: str, files: list[tuple[str, str | Path]]) -> tuple[Path, list[Path]]:
    """Check every (file name as sent, where the server holds it) then write them to RUNS/uploads/NAME/; returns
    (the folder, the images written). Raises UploadError (one line) before writing anything."""
    folder = folder_for(runs, name)
    if not files:
        raise UploadError("no files to upload: choose images (and their .txt captions)")
    if len(files) > MAX_FILES:
        raise UploadError(f"{len(files)} files: upload at most {MAX_FILES} at a time")
    checked: list[tuple[str, Path]] = []
    for sent, held in files:
        own = safe_file_name(sent)
        suffix = Path(own).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            check_image(Path(held), own)
        elif suffix in CAPTION_SUFFIXES or own == METADATA:
            check_text(Path(held), own)
        else:
            raise UploadError(f"upload {own}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a .txt caption "
                              f"or {METADATA}")
        checked.append((own, Path(held)))
    if len({own for own, _ in checked}) != len(checked):
        raise UploadError("two uploads have the same file name: rename one")
    folder.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for own, held in checked:
            shutil.copyfile(held, aside / own)
        folder.mkdir(exist_ok=True)
        for own, _ in checked:
            os.replace(aside / own, folder / own)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    images = [folder / own for own, _ in checked if Path(own).suffix.lower() in IMAGE_SUFFIXES]
    return folder, images
