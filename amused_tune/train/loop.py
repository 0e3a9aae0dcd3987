"""The training loop: `train(recipe)` fine-tunes aMUSEd's U-ViT with the MaskGIT objective.

Read `_run` top to bottom: `set_up` (output folder, accelerate, the base with LoRA attached or unfrozen, validated
data, optimizer and schedule), resume from a checkpoint, then per optimizer step `train_step` (step.py: accumulate
`grad_accum` micro-batches, clip, update), report it (progress.py), sample a validation grid when due and
checkpoint; `finish` writes the deliverables. Building blocks are in setup.py, stopping early in stops.py.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from amused_tune.common import RECIPE_FILE
from amused_tune.data.datasets import collate, prepare_training_data
from amused_tune.data.preflight import DataPlan
from amused_tune.model.bases import Components, load_components
from amused_tune.recipe import Recipe
from amused_tune.train import checkpoints, compiling, outputs, report
from amused_tune.train.progress import Reporter
from amused_tune.train.runlog import RunLog
from amused_tune.train.setup import (EpochSampler, check_distributed, check_resolution, make_accelerator,
                                     make_optimizer, make_scheduler, param_groups, place_encoders, setup_models)
from amused_tune.train.step import Conditioning, train_step
from amused_tune.train.stops import StopFlag, TrainingStopped  # noqa: F401 (TrainingStopped: what train raises)
from amused_tune.train.validation import Validator
from amused_tune.train.ema import EMA, make_ema, swap
from amused_tune.train import heldout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """Everything one training run works with, built once by `set_up` and never re-bound.

    `comps` holds the raw modules (LoRA attached, never replaced by a wrapper): saving, validation and checkpoints
    use them. `transformer` and `text_encoder` are what the training step calls: the same modules, wrapped for
    data parallelism (DDP) or compiled where the run asks for it.
    """

    recipe: Recipe
    out: Path
    accelerator: Accelerator
    comps: Components  # raw modules
    transformer: torch.nn.Module  # the U-ViT as the step calls it (DDP-wrapped, compiled)
    text_encoder: torch.nn.Module  # the text encoder as the step calls it (DDP-wrapped when it trains)
    trainable: list[torch.nn.Parameter]
    names: dict[int, str]  # id(parameter) -> its name in checkpoints
    dataset: Dataset
    empty: Conditioning  # the empty prompt's embeddings (condition dropout)
    validator: Validator
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    generators: dict[str, torch.Generator]  # mask and condition-dropout draws, per process
    ema: EMA | None = None  # train.ema_decay: the average of the trainable weights
    heldout: heldout.HeldOut | None = None  # validation.holdout: the images kept out of training

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def wrapped(self) -> list[torch.nn.Module]:
        """The modules whose gradients DDP all-reduces (no_sync during accumulation)."""
        return [self.transformer] + ([self.text_encoder] if self.recipe.adapter.text_encoder else [])

    @property
    def rngs(self) -> dict:
        """What a checkpoint saves of this process's randomness."""
        return {**self.generators, **checkpoints.dataset_rngs(self.dataset)}

    def validate(self, step: int) -> None:
        swap(self.ema)  # the grid is drawn with the EMA weights
        self.validator(self.comps.transformer, step, self.out, self.accelerator)
        swap(self.ema)  # back to the trained weights

    def save(self, step: int, skipped: int) -> None:
        checkpoints.save(self, step, skipped)


def train(recipe: Recipe, components: Components | None = None, data: DataPlan | None = None) -> dict:
    """Run one recipe to `train.max_steps`; returns a summary (final step, loss, output paths). `data`: the recipe's
    data as the command's preflight resolved and listed it (data.preflight; made here when None).

    Raises TrainingStopped after SIGINT/SIGTERM (once a checkpoint is written) or a non-finite loss (nothing written).
    """
    stop = StopFlag()
    run_log = RunLog(Path(recipe.output.dir))  # OUTPUT_DIR/train.log, started once the folder is this run's
    try:
        summary = _run(recipe, components, stop, data, run_log)
        run_log.line(f"finished: step {summary['step']}, outputs in {summary['output_dir']}")
        return summary
    except BaseException as err:
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress line, so the error gets its own
            bar.close()
        said = str(err).splitlines()[0] if str(err) else ""
        run_log.line(f"ended: {said or type(err).__name__}")
        raise
    finally:
        stop.restore()
        run_log.close()


def _run(recipe: Recipe, components: Components | None, stop: StopFlag, data: DataPlan | None,
         run_log: RunLog | None = None) -> dict:
    run = set_up(recipe, components, data, run_log)
    t = recipe.train
    resumed = None if t.resume == "none" else checkpoints.resume(run)
    step, skipped = (resumed.step, resumed.skipped) if resumed else (0, 0)
    if step >= t.max_steps:
        return already_done(run, step)
    batches = iter(data_loader(run, step))
    checkpoints.restore_rng(resumed, run.rngs, run.accelerator, recipe)  # after iter(): it draws from torch's RNG
    reporter = Reporter(run, step)
    clock = compiling.CompileClock(t.compile, run.device, bool(recipe.model.quantize), t.max_steps)
    stop.install()
    if run.main and step == 0 and run.validator.enabled:
        run.validate(0)
    if step == 0:
        heldout.record(run, reporter.metrics, 0)
    loss = float("nan")
    while step < t.max_steps:
        result = train_step(run, batches, step + 1)
        if result.finite and run.ema is not None:
            run.ema.update()
        step, loss = step + 1, result.loss
        if not result.finite:  # train.skip_nonfinite: counted, and said
            skipped += 1
            log.warning("step %d: non-finite loss (%s) or gradient norm (%s): skipped (%d so far)",
                        step, result.loss, result.grad_norm, skipped)
        compile_now, compile_metrics = clock.after_step(step, result.seconds)
        if compile_now:  # train.compile=auto: the steps left repay compiling
            run = dataclasses.replace(run, transformer=compiling.compiled(run.transformer))
        reporter.step(step, result, skipped, compile_metrics)
        if run.main and run.validator.due(step):
            run.validate(step)
        heldout.record(run, reporter.metrics, step)
        stopping = stop.agreed(run.accelerator)  # every process stops after the same step
        if step % t.checkpoint_every == 0 or step == t.max_steps or stopping:
            run.save(step, skipped)
        if stopping:
            reporter.close()
            raise TrainingStopped(
                f"stopped by {signal.Signals(stopping).name} after step {step}; checkpoint written to "
                f"{run.out / 'checkpoints' / f'step-{step}'}. Resume with: amused-tune {run.out / RECIPE_FILE} "
                "--train.resume=auto", 128 + stopping)
    reporter.close()
    stop.restore()
    return finish(run, step, loss, skipped)


def set_up(recipe: Recipe, components: Components | None, data: DataPlan | None = None,
           run_log: RunLog | None = None) -> Run:
    """Output folder, accelerate, the base (LoRA attached or unfrozen), validated data, optimizer and schedule, then
    the wrappers. The order matters and lives here only: encoders placed before the data (the cache encodes with
    them alone), LoRA attached once the data is ready, wrappers made last and kept apart from the raw modules."""
    recipe.resolve().validate()
    out = Path(recipe.output.dir)
    accelerator = make_accelerator(recipe)
    check_distributed(accelerator)
    outputs.prepare_output_dir(out, recipe, accelerator.is_main_process)
    accelerator.wait_for_everyone()  # the main process may have discarded an old run (output.overwrite)
    if run_log is not None and accelerator.is_main_process:
        run_log.start()
    start_trackers(accelerator, recipe)

    if components is None:
        report.loading(recipe)
    comps = components or load_components(recipe.model.base)
    check_resolution(recipe, comps)
    device = accelerator.device
    place_encoders(recipe, comps, device)  # the U-ViT waits: building the cache holds only the encoders
    dataset, empty_embeds = prepare_training_data(recipe, comps, accelerator, data)  # validates; may cache, offload
    dataset, held = heldout.split(dataset, recipe.validation.holdout, recipe.train.seed)
    set_seed(recipe.train.seed)  # the init of the LoRA weights, identical on every process
    trainable = setup_models(recipe, comps, device)
    set_seed(recipe.train.seed, device_specific=True)  # then each process draws its own LoRA dropout
    names = {id(p): n for n, p in list(comps.transformer.named_parameters()) + [
        (f"text_encoder.{n}", p) for n, p in comps.text_encoder.named_parameters()]}
    report.banner(recipe, out, accelerator.num_processes)
    empty = Conditioning(*(e.to(device) for e in empty_embeds))
    validator = Validator(recipe, comps, (empty.hidden, empty.pooled))
    if validator.defaults_message:
        accelerator.print(validator.defaults_message)

    optimizer = make_optimizer(recipe, param_groups([comps.transformer, comps.text_encoder], recipe.optim.weight_decay))
    lr_scheduler = make_scheduler(recipe, optimizer)
    transformer, text_encoder, optimizer = wrap(recipe, accelerator, comps, optimizer)
    seed = recipe.train.seed * 1_000_003 + accelerator.process_index
    generators = {"mask": torch.Generator().manual_seed(seed), "dropout": torch.Generator().manual_seed(seed + 1)}
    return Run(recipe, out, accelerator, comps, transformer, text_encoder, trainable, names, dataset, empty,
               validator, optimizer, lr_scheduler, generators, make_ema(recipe, trainable, names),
               heldout.make(held, recipe, comps, device))


def wrap(recipe: Recipe, accelerator: Accelerator, comps: Components, optimizer):
    """(U-ViT, text encoder, optimizer) as the training step uses them: DDP-wrapped by accelerate when the launch
    is distributed, the U-ViT compiled with `train.compile: true` (`auto` decides in the loop, train/compiling.py).
    `comps` keeps the raw modules."""
    transformer, optimizer = accelerator.prepare(comps.transformer, optimizer)
    text_encoder = accelerator.prepare(comps.text_encoder) if recipe.adapter.text_encoder else comps.text_encoder
    if compiling.mode(recipe.train.compile, accelerator.device, bool(recipe.model.quantize)) == "on":
        transformer = compiling.compiled(transformer)
    return transformer, text_encoder, optimizer


def start_trackers(accelerator: Accelerator, recipe: Recipe) -> None:
    """TensorBoard / Weights & Biases (`output.log_with`): started once, with the recipe as their config."""
    if accelerator.log_with:
        flat = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
                for section, values in recipe.to_dict().items() for key, value in values.items()}
        accelerator.init_trackers(Path(recipe.output.dir).name or "amused-tune", config=flat)


def data_loader(run: Run, step: int) -> DataLoader:
    """Batches from this process's shard of the endless data order, starting after optimizer step `step`."""
    t, accelerator = run.recipe.train, run.accelerator
    sampler = EpochSampler(len(run.dataset), t.seed, accelerator.process_index, accelerator.num_processes,
                           start=step * t.batch_size * t.grad_accum)
    return DataLoader(run.dataset, batch_size=t.batch_size, collate_fn=collate, sampler=sampler,
                      num_workers=run.recipe.data.num_workers, pin_memory=run.device.type == "cuda")


def already_done(run: Run, step: int) -> dict:
    """A run resumed at or past train.max_steps: nothing to train; its deliverables if a stop left them unwritten."""
    run.accelerator.print(f"{run.out} already reached train.max_steps={run.recipe.train.max_steps} (checkpoint at "
                          f"step {step}): nothing to do; pass a larger --train.max_steps to train further")
    summary = {"step": step, "output_dir": str(run.out), "already_done": True}
    if run.main and not outputs.final_written(run.out, run.recipe):  # stopped between its last save and here
        summary.update(outputs.write_final(run.out, run.recipe, run.comps.transformer,
                                           run.comps))
    return summary


def finish(run: Run, step: int, loss: float, skipped: int) -> dict:
    """The deliverables (adapter or U-ViT, loss plot, model card, push) once every process is done; the summary."""
    run.accelerator.wait_for_everyone()
    summary = {"step": step, "loss": loss, "output_dir": str(run.out), "skipped_nonfinite": skipped}
    if run.main and run.ema is not None and run.recipe.adapter.kind != "full":  # the last trained weights too
        outputs.save_adapter(run.out / "adapter-raw", run.comps.transformer, base_model=run.recipe.model.base,
                             what="the last trained weights")
    swap(run.ema)  # the EMA weights are the deliverable
    if run.main:
        summary.update(outputs.write_final(run.out, run.recipe, run.comps.transformer,
                                           run.comps))
    swap(run.ema)
    run.accelerator.end_training()
    return summary
