"""The one place a training loop reports each optimizer step: metrics.jsonl, TensorBoard and the progress bar
(written by the main process). What a run shows per step changes here, not in the loop."""

from __future__ import annotations

from amused_tune.common import METRICS_FILE
from amused_tune.train import outputs
from amused_tune.train.step import StepResult, peak_memory_gb


class Reporter:
    """Reports the steps of `run` (a loop.Run) that starts, or resumes, after optimizer step `step`."""

    def __init__(self, run, step: int):
        from tqdm.auto import tqdm

        t = run.recipe.train
        self.run = run
        self.metrics = outputs.MetricsFile(run.out / METRICS_FILE, resumed_step=step, enabled=run.main)
        self.bar = tqdm(total=t.max_steps, initial=step, disable=not run.main, desc="train", dynamic_ncols=True)
        self.images_per_step = t.batch_size * t.grad_accum * run.accelerator.num_processes
        self.scaler_skipped = 0  # steps the fp16 loss scaler skipped (overflowing gradients), in this process's run

    def step(self, step: int, result: StepResult, skipped: int, extra: dict | None = None) -> dict:
        """Record optimizer step `step` (every train.log_every steps and the last, and any step with `extra`
        metrics, such as the compile time); returns its metrics row."""
        t = self.run.recipe.train
        row = {"step": step, "loss": result.loss, "lr": self.run.lr_scheduler.get_last_lr()[0],
               "grad_norm": result.grad_norm, "images_per_s": self.images_per_step / result.seconds,
               "step_s": result.seconds, "peak_mem_gb": peak_memory_gb(), "skipped_nonfinite": skipped}
        if result.loss_scale is not None:  # fp16: the loss scale, and whether the scaler skipped this step
            self.scaler_skipped += result.scaler_skipped
            row.update(loss_scale=result.loss_scale, scaler_skipped=self.scaler_skipped)
        row.update(extra or {})
        if step % t.log_every == 0 or step == t.max_steps or extra:
            self.metrics.write(row)
            if self.run.accelerator.trackers:  # output.log_with: TensorBoard, Weights & Biases
                self.run.accelerator.log({k: v for k, v in row.items() if k != "step" and v == v}, step=step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", img_s=f"{row['images_per_s']:.1f}", lr=f"{row['lr']:.2e}")
        return row

    def close(self) -> None:
        self.bar.close()
