"""How a run stops early: `TrainingStopped` (what the command reports, with its exit code), the SIGINT/SIGTERM
handling that lets the current step finish and a checkpoint be written, and the message for a non-finite loss."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from amused_tune.train import checkpoints


class TrainingStopped(Exception):
    """The run stopped early: a signal (after saving a checkpoint) or a non-finite loss (`error`: nothing saved, the
    last checkpoint intact). `exit_code` is what the CLI returns: 128 + the signal, or 1."""

    def __init__(self, message: str, exit_code: int, error: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.error = error


class StopFlag:
    """SIGINT/SIGTERM during the loop: the first signal lets the loop finish its optimizer step, write a checkpoint
    and raise TrainingStopped (exit code 128 + signal: 130, 143). A second one is only acknowledged (the checkpoint
    being written completes); a third aborts at once with KeyboardInterrupt: the partial checkpoint folder is
    removed and the previous checkpoint is untouched either way. Signals within a second of the previous one count
    once (`accelerate launch` forwards the Ctrl-C that the processes already got from the terminal)."""

    def __init__(self):
        self.signum = 0
        self.count = 0
        self._last = 0.0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.count and now - self._last < 1.0:  # a launcher forwarding the same Ctrl-C: not a new one
            return
        self._last = now
        self.count += 1
        say = os.environ.get("RANK", "0") == "0"  # launched processes all get the signal: one of them says so
        if self.count == 1:
            self.signum = signum
            if say:
                print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                      "(interrupt twice more to abort without it)", file=sys.stderr, flush=True)
        elif self.count == 2:
            if say:
                print("already stopping: the checkpoint is being written (the previous one stays intact); "
                      "interrupt once more to abort", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt

    def agreed(self, accelerator) -> int:
        """The signal that stops the run, the same on every process (0: none)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass
        self._previous.clear()


def nonfinite_message(out: Path, step: int, loss: float, grad_norm: float) -> str:
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
    found = checkpoints.list_checkpoints(out / "checkpoints")
    kept = f"the last good checkpoint, {found[-1]}, is intact" if found else "no checkpoint had been written yet"
    return (f"non-finite {what} at step {step}: the run stopped and {kept}. Rerun the same command with "
            "--train.skip_nonfinite=true to skip such steps, or lower optim.lr (a new recipe: use a new output.dir)")
