"""An exponential moving average (EMA) of the trained weights (`train.ema_decay`).

After optimizer step number n (n = 1, 2, ...; a skipped non-finite step updates nothing and does not count), every
EMA weight e moves toward its trained weight w:

    d_n = min(decay, (1 + n) / (10 + n))        e <- d_n * e + (1 - d_n) * w

The second term is the warm-up: d_1 = 2/11, d_10 = 0.55, d_90 = 0.91, so the average forgets the initial weights
within the first steps instead of after ~1 / (1 - decay) of them, and a short run's EMA is not just its start.
The EMA starts from the weights before the first step. It is held in fp32, next to the weights or on the CPU
(`train.ema_device`); `swap` exchanges it with the model's weights for sampling and saving (twice: back to the
trained weights), which are what the optimizer and the checkpoints' exact resume continue from.
"""

from __future__ import annotations

import contextlib

import torch


def decay_at(decay: float, n: int) -> float:
    """The decay of update number n (1-based): min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1 + n) / (10 + n))


class EMA:
    """The EMA of `params` (named by `names`, as in checkpoints), on `device` (None: where each weight is)."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], decay: float,
                 device: str | torch.device | None = None):
        self.params, self.names, self.decay = list(params), list(names), decay
        self.weights = [p.detach().to(device or p.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> float:
        """Move the average after an optimizer step; returns the decay used."""
        self.updates += 1
        d = decay_at(self.decay, self.updates)
        current = [p.detach().to(e.device, torch.float32) for e, p in zip(self.weights, self.params)]
        torch._foreach_mul_(self.weights, d)  # the same two roundings per weight as e.mul_(d).add_(w, alpha=1 - d)
        torch._foreach_add_(self.weights, current, alpha=1 - d)
        return d

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": {n: e.cpu() for n, e in zip(self.names, self.weights)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["weights"]
        missing = [n for n in self.names if n not in saved]
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {len(missing)} weights, e.g. {missing[0]}")
        for n, e in zip(self.names, self.weights):
            e.copy_(saved[n])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the EMA weights and the model's: once to sample or save with the EMA, once more to go back."""
        for p, e in zip(self.params, self.weights):
            held = p.detach().to(e.device, torch.float32, copy=True)
            p.copy_(e.to(p.device, p.dtype))
            e.copy_(held)

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the duration; the trained weights after."""
        self.swap()
        try:
            yield self
        finally:
            self.swap()


def swap(ema: EMA | None) -> None:
    """`ema.swap()`, or nothing when the run keeps no EMA (the trainer calls it around sampling and saving)."""
    if ema is not None:
        ema.swap()


def make_ema(recipe, trainable: list[torch.nn.Parameter], names: dict[int, str]) -> EMA | None:
    """The EMA of a run's trainable weights (`train.ema_decay`, on `train.ema_device`), or None without one."""
    t = recipe.train
    if not t.ema_decay:
        return None
    return EMA(trainable, [names[id(p)] for p in trainable], t.ema_decay, "cpu" if t.ema_device == "cpu" else None)
