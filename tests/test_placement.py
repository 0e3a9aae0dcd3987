"""Where and in which dtype the frozen weights land: a narrowing cast happens before the move to the GPU, so the
device never holds the wider copy (on an H200 the fp32 U-ViT of amused-256 moved first, then cast, peaked at
2.5 GB where the bf16 weights need 1.2 GB)."""

from __future__ import annotations

import torch

from amused_tune.common import place


class Recorder(torch.nn.Module):
    """A module that records the dtype of its weight each time it changes device."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        self.moves: list[tuple[str, torch.dtype]] = []

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        if device is not None:
            self.moves.append((str(device), self.weight.dtype))
        return out


def test_narrowing_cast_happens_before_the_move():
    module = Recorder()
    place(module, torch.device("cpu"), torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16
    assert module.moves == [("cpu", torch.bfloat16)]  # already bf16 when it moved


def test_widening_cast_happens_after_the_move():
    module = Recorder(torch.bfloat16)
    place(module, torch.device("cpu"), torch.float32)
    assert module.weight.dtype == torch.float32
    assert module.moves == [("cpu", torch.bfloat16)]  # moved in the narrow dtype, widened there


def test_same_dtype_is_only_moved():
    module = Recorder()
    place(module, "cpu", torch.float32)
    assert module.weight.dtype == torch.float32 and module.moves == [("cpu", torch.float32)]
