"""`train.compile` (true, false, auto): torch.compile of the U-ViT for training; `auto` compiles when the run is
long enough to repay the compile time.

On a GPU at batch 1 a step is bound by launching many small kernels, and a compiled U-ViT launches far fewer
(measured on one H200, real-size amused-256, batch 1: 0.210 -> 0.095 s per micro-step, 2.2x, after 106 s of
compiling). On the CPU the kernels are the time and compiling takes minutes. So `auto` is off on the CPU (and with a
quantized base); on CUDA the first `EAGER_STEPS` optimizer steps run eagerly and time the step, and the U-ViT is
compiled when the steps left would, eager, take long enough that a conservative saving (`SPEEDUP_GUESS`) repays a
conservative compile time (`COMPILE_S_GUESS`) twice over. The compile time itself (the first compiled step's time
minus an eager step's) goes to the log and to metrics.jsonl (`compile_s`).
"""

from __future__ import annotations

import logging
import statistics

import torch

log = logging.getLogger(__name__)

EAGER_STEPS = 3  # auto: optimizer steps timed eagerly before deciding (the first, with lazy set-up, is not used)
COMPILE_S_GUESS = 150.0  # seconds to compile the U-ViT's forward and backward (106 s measured at 256 px, H200)
SPEEDUP_GUESS = 1.5  # eager step time / compiled step time assumed (2.2x measured at batch 1, 256 px, H200)


def mode(setting: bool | str, device: torch.device, quantized: bool) -> str:
    """"on", "off" or "auto" (decide after the first steps) for `train.compile` on `device`."""
    if setting == "auto":
        return "auto" if device.type == "cuda" and not quantized else "off"
    return "on" if setting else "off"


def repays(step_seconds: list[float], steps_left: int, compile_s: float = COMPILE_S_GUESS,
           speedup: float = SPEEDUP_GUESS) -> bool:
    """Whether compiling now pays twice over: the steps left, at the eager step time (the median of the timed
    steps, the first left out), would save more than twice the compile time at `speedup`."""
    timed = step_seconds[1:] or step_seconds
    if not timed or steps_left <= 0:
        return False
    eager = statistics.median(timed)
    return steps_left * eager * (1 - 1 / speedup) > 2 * compile_s


class CompileClock:
    """Follows a run's step times: says when `auto` should compile, and what compiling cost once it is known."""

    def __init__(self, setting: bool | str, device: torch.device, quantized: bool, max_steps: int):
        self.mode = mode(setting, device, quantized)
        self.max_steps = max_steps
        self.eager: list[float] = []  # seconds of the eager steps
        self.compiled_at: int | None = 0 if self.mode == "on" else None  # the step after which it compiled
        self.first_compiled: float | None = None
        self.reported = False

    def after_step(self, step: int, seconds: float) -> tuple[bool, dict]:
        """Record optimizer step `step`; returns (compile now, metrics to add to this step's row)."""
        if self.mode == "off":
            return False, {}
        if self.compiled_at is None:
            self.eager.append(seconds)
            if self.mode == "auto" and len(self.eager) >= EAGER_STEPS:
                if repays(self.eager, self.max_steps - step):
                    self.compiled_at = step
                    log.info("train.compile=auto: %d steps left at %.2f s each: compiling the U-ViT (the next step "
                             "compiles)", self.max_steps - step, statistics.median(self.eager[1:]))
                    return True, {}
                self.mode = "off"  # decided once
            return False, {}
        if self.reported:
            return False, {}
        if self.first_compiled is None:
            self.first_compiled = seconds
            if not self.eager:  # compiled from the start: wait for a compiled step to compare with
                return False, {}
            baseline = statistics.median(self.eager[1:] or self.eager)
        else:
            baseline = seconds
        self.reported = True
        compile_s = max(self.first_compiled - baseline, 0.0)
        log.info("compiled the U-ViT in %.1f s (the first compiled step took %.1f s, a step %.2f s)",
                 compile_s, self.first_compiled, baseline)
        return False, {"compile_s": round(compile_s, 2)}


def compiled(transformer: torch.nn.Module) -> torch.nn.Module:
    """The U-ViT as the training step calls it, compiled (it compiles at its first call)."""
    return torch.compile(transformer)
