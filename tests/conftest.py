"""Shared test fixtures: tiny models, fixture images, a clean accelerate state, no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "AMUSED_TUNE_CACHE" not in os.environ:  # tests never write into the user's ~/.cache
    import tempfile

    os.environ["AMUSED_TUNE_CACHE"] = tempfile.mkdtemp(prefix="amused-tune-test-cache-")
torch.set_num_threads(1)  # the CI machine has 2 cores; one thread per test process is the fastest overall


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the whole suite: also the tests marked slow (learning checks, real-size shapes, "
                          "multi-process runs, the README's commands, the browser); what CI runs")


def pytest_collection_modifyitems(config, items):
    """`pytest` alone runs the fast set; `pytest --full` (or any `-m` expression) decides otherwise."""
    if config.getoption("--full") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def reset_accelerate() -> None:
    """Forget accelerate's global state (it keeps one between Accelerator objects): call between two runs in a test."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Every test starts from a clean accelerate state."""
    yield
    reset_accelerate()


def make_images(folder: Path, n: int = 4, size: int = 40, captions: bool = True) -> Path:
    """n small, distinct RGB images in `folder` with a metadata.jsonl (imagefolder layout)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40), (200, 60, 200), (40, 200, 200)]
    for i in range(n):
        img = Image.new("RGB", (size, size), colours[i % len(colours)])
        for x in range(size // 4, size // 2):
            for y in range(size // 4, 3 * size // 4):
                img.putpixel((x + i % 3, y), (255, 255, 255))
        name = f"img{i}.png"
        img.save(folder / name)
        rows.append({"file_name": name, "text": f"a picture number {i}"})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_images(tmp_path / "data")


def tiny_uvit_inputs() -> dict:
    """Fixed random inputs for the tiny U-ViT (2 images, 8x8 tokens, 32-wide text), the same every call."""
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(0, 64, (2, 8, 8), generator=g),
                encoder_hidden_states=torch.randn(2, 77, 32, generator=g),
                pooled_text_emb=torch.randn(2, 32, generator=g),
                micro_conds=torch.tensor([[32.0, 32.0, 0.0, 0.0, 6.0]] * 2))


@torch.no_grad()
def tiny_uvit_logits(transformer) -> torch.Tensor:
    return transformer.eval()(**tiny_uvit_inputs())


def tiny_with_random_lora(seed: int = 0):
    """The tiny model with a rank-4 LoRA whose B matrices are random (so the adapter changes the logits)."""
    from amused_tune.model.adapters import attach_lora
    from amused_tune.model.bases import build_tiny

    comps = build_tiny()
    attach_lora(comps.transformer, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in comps.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return comps
