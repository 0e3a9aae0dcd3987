"""The toy pretrained aMUSEd shipped with the kit, and the synthetic world it was trained on.

``model.base: toy`` loads `toy_dir()`, a diffusers pipeline folder (transformer/, vqvae/, text_encoder/,
tokenizer/, scheduler/, plus sampling.json with its sampling defaults) committed under
``amused_tune/toy/weights/``. It is small enough to sample and fine-tune on a CPU in seconds, and it was trained
on a world simple enough that an exact classifier (`amused_tune.toy.classify`) says whether a sample shows what
its caption asked for: learning itself is tested.

- `world`: the images (pixel art on an 8x8 grid of 4x4-pixel cells: a square, circle or triangle of one colour on
  a background of another) and their captions ("a red circle on a blue background"), plus the fine-tuning sets
  (a new colour, the ``[v] style`` frame).
- `classify`: the exact classifier and the caption-match rate.
- `text`: the toy's word-level tokenizer.
- `build`: ``python -m amused_tune.toy build`` rebuilds the weights from scratch (VQ, text encoder and U-ViT);
  `evaluate` / `finetune_eval`: ``python -m amused_tune.toy eval [--adapter RUN_DIR]`` measures the base or a
  fine-tuning run on it; `report`: the model card's table of those numbers.

See docs/toy.md.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def toy_dir() -> Path:
    """The folder of the shipped toy pipeline (``amused_tune/toy/weights``)."""
    if not (WEIGHTS_DIR / "transformer").is_dir():
        raise FileNotFoundError(
            f"the toy weights are missing from {WEIGHTS_DIR}: rebuild them with `python -m amused_tune.toy build`"
        )
    return WEIGHTS_DIR
