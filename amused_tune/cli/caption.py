"""`amused-tune caption FOLDER`: write a `.txt` caption next to every image of a folder with an image-to-text model,
so that a recipe with `data.source: folder` (or captionfolder) trains on it unchanged.

The captioner is any transformers model that `AutoModelForImageTextToText` and `AutoProcessor` load (a Hub id,
downloaded once into the Hub cache, or a local folder); the default is BLIP base
(`BlipForConditionalGeneration`, ~250M parameters). Existing captions are kept unless `--overwrite`; images that
cannot be read are named and skipped, the rest are captioned. Batches of `--batch-size` images on the GPU when
there is one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from amused_tune.cli.args import SubcommandParser, fail, quiet_libraries
from amused_tune.data.captions import with_trigger
from amused_tune.data.sources import IMAGE_SUFFIXES
from amused_tune.writes import is_write_failure, write_file

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"


def build_parser() -> SubcommandParser:
    p = SubcommandParser(prog="amused-tune caption",
                         description="Write a .txt caption per image of FOLDER with an image-to-text model.")
    p.add_argument("folder", metavar="FOLDER", help="a folder of images (searched recursively)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="captioner: a Hub id or a local folder that transformers' AutoModelForImageTextToText loads")
    p.add_argument("--prefix", default="", help="text put before every generated caption, e.g. 'a photo of '")
    p.add_argument("--trigger", default=None, help="a trigger word written as the first tag: 'sks, <caption>'")
    p.add_argument("--overwrite", action="store_true", help="replace existing .txt captions (default: keep them)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 16 on a GPU, 4 on the CPU)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="longest caption, in tokens")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p


@dataclass
class Captioned:
    """What a run over a folder did: files written, captions kept, images that could not be read (with why)."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_captioner(model: str, device: str):
    """(processor, model) of an image-to-text captioner, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
    return processor, net


def open_images(paths: list[Path], result: Captioned) -> list[tuple[Path, object]]:
    """The readable images among `paths` (RGB); the others are recorded in `result.unreadable`."""
    from PIL import Image

    opened = []
    for path in paths:
        try:
            with Image.open(path) as img:
                opened.append((path, img.convert("RGB")))
        except Exception as err:  # not an image, truncated, unsupported
            result.unreadable.append((path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
    return opened


def caption_folder(folder: str | Path, model: str = DEFAULT_MODEL, prefix: str = "", trigger: str | None = None,
                   overwrite: bool = False, batch_size: int | None = None, max_new_tokens: int = 40,
                   device: str | None = None, progress: bool = True) -> Captioned:
    """Caption every image of `folder` that has no .txt yet (every image with `overwrite`)."""
    import torch
    from tqdm.auto import tqdm

    folder = Path(folder).expanduser()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or (16 if device.startswith("cuda") else 4)
    result = Captioned()
    todo = []
    for path in images_in(folder):
        (todo if overwrite or not path.with_suffix(".txt").is_file() else result.kept).append(path)
    if not todo:
        return result
    processor, net = load_captioner(model, device)
    with tqdm(total=len(todo), desc="caption", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = open_images(todo[start:start + batch_size], result)
            if batch:
                inputs = processor(images=[img for _, img in batch], return_tensors="pt").to(device)
                inputs = {k: (v.to(net.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
                with torch.no_grad():
                    out = net.generate(**inputs, max_new_tokens=max_new_tokens)
                for (path, _), text in zip(batch, processor.batch_decode(out, skip_special_tokens=True)):
                    write_caption(path, prefix + text.strip(), trigger, result)
            bar.update(len(todo[start:start + batch_size]))
    return result


def write_caption(image: Path, caption: str, trigger: str | None, result: Captioned) -> None:
    caption = with_trigger(caption.strip(), trigger)
    if not caption:
        result.empty.append(image)
        return
    result.written.append(write_file(image.with_suffix(".txt"), caption + "\n", "a caption"))


def main(argv: list[str]) -> int:
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        return fail(f"FOLDER {args.folder} is not a folder of images")
    if not images_in(folder):
        return fail(f"{args.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not os.access(folder, os.W_OK):  # the captions go next to the images
        return fail(f"FOLDER {args.folder} is read-only: the captions are written next to the images; copy the folder "
                    "to a writable disk or make it writable")
    quiet_libraries()
    try:
        result = caption_folder(folder, args.model, args.prefix, args.trigger, args.overwrite, args.batch_size,
                                args.max_new_tokens, args.device)
    except OSError as err:  # no such model, offline and not cached (a failed write: amused_tune.cli.main says it)
        if is_write_failure(err):
            raise
        return fail(f"--model {args.model} could not be loaded ({str(err).splitlines()[0]}): pass a Hub id of an "
                    "image-to-text model or a local folder holding one")
    for path, why in result.unreadable:
        print(f"unreadable, not captioned: {path} ({why})")
    for path in result.empty:
        print(f"the captioner returned nothing for {path}: no .txt written")
    print(f"{folder}: {len(result.written)} captions written, {len(result.kept)} kept (--overwrite replaces them), "
          f"{len(result.unreadable)} unreadable images")
    if (folder / "metadata.jsonl").is_file():
        print(f"note: {folder}/metadata.jsonl exists, and data.source=folder reads its captions instead of the .txt "
              "files: use data.source=captionfolder to train on these")
    return 1 if result.unreadable and not result.written and not result.kept else 0
