"""Will it fit? The peak GPU memory of a recipe, predicted from the recipe alone (no GPU, no weights, no download).

`estimate(recipe)` counts what the GPU holds during training, from the real-size architectures built on the meta
device (docs/memory.md):

- weights: the U-ViT (frozen in `model.dtype`, or 8/4-bit with `model.quantize`, or fp32 when fully fine-tuned),
  the LoRA weights (fp32), the text encoder and the VQ model (or nothing, when `data.cache` moves them off the GPU);
- gradients (fp32, one per trainable weight) and the optimizer state (the registry's `state_bytes`, amused_tune/optimizers.py): AdamW keeps two
  fp32 moments per weight; bitsandbytes' 8-bit AdamW one byte per element per moment plus an fp32 scale per
  256-element block, except for tensors under `min_8bit_size` (4096) elements, which keep fp32 moments; 8-bit Lion
  one such moment; Prodigy four fp32 buffers; Adafactor a row and a column of each matrix; the EMA copy
  (`train.ema_decay`) one fp32 copy of the trainable weights when `train.ema_device` keeps it on the GPU;
- activations and transient buffers, measured by running one micro-step on meta tensors (`memory_trace`) at
  batch 1 and 2 and scaling linearly to the recipe's batch;
- the optimizer step's temporary (torch's AdamW builds one fp32 copy of the trainable weights).

The peak is the largest of its moments: building the cache (`data.cache`, first run over the data: the VQ model
and text encoder alone on the GPU, the U-ViT placed afterwards, `cache_batches` images at a time), encoding a batch
(VQ and text encoder, when not cached), the forward/backward of a micro-step, the optimizer step and the validation
grid (decoded one image at a time). `trainer="reference"` sets the same
estimator to what diffusers' train_amused.py keeps (fp32 U-ViT under fp16 autocast, fp16 text encoder and fp32 VQ
model resident and run every step): `tests/test_memory.py` checks it against that trainer's measured peaks.
`memory_fit.fit` turns on the levers that make a recipe fit (`--max-memory`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from amused_tune.common import DTYPE_BYTES
from amused_tune.optimizers import REGISTRY as OPTIMIZERS

GB = 10**9  # decimal gigabytes, the unit of the reference measurements (docs/memory.md)
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256  # 4-bit: one 8-bit absmax per 64 weights, one fp32 per 256 of those
CODEBOOK = 8192  # the U-ViT's output classes
CUDA_WORKSPACE = 32 * 2**20  # cuBLAS' workspace on recent GPUs, allocated through torch's caching allocator
CUDA_CONTEXT_GB = 0.5  # what the CUDA context and kernels take outside torch's count (kept free by --max-memory)
CACHE_PIXELS = 4 * 256 * 256  # pixels per fp32 VQ-encoding batch when the cache is built: 4 images at 256 px, 1 at 512
CACHE_TEXT_BATCH = 16  # prompts per text-encoder batch when the cache is built
ENCODING = "building the cache"  # the moment of the first run over a dataset with data.cache


def cache_batches(resolution: int) -> tuple[int, int]:
    """(images, prompts) the cache encodes at once at `resolution`: few enough images that building the cache, with
    the VQ model and text encoder alone on the GPU, holds less than a LoRA training step (docs/memory.md)."""
    return max(1, min(16, CACHE_PIXELS // (resolution * resolution))), CACHE_TEXT_BATCH


class EstimateError(ValueError):
    """A recipe the estimator cannot size; the message says what to pass instead."""


@dataclass(frozen=True)
class Plan:
    """What a trainer keeps on the GPU for one recipe: the estimator's whole input."""

    resolution: int
    full: bool
    frozen_dtype: str  # the frozen U-ViT (LoRA)
    text_dtype: str
    vq_dtype: str
    cache: bool  # VQ model and text encoder off the GPU, batches arrive encoded
    text_lora: bool
    quantize: str | None
    adam_8bit: bool
    batch_size: int
    grad_accum: int
    autocast: str
    grad_checkpointing: bool
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v")
    adapter_kind: str = "lora"  # lora, dora, lokr or loha: what the trainable weights are (not used when full)
    loss: str = "kit"
    validation_images: int = 0  # the sample grid drawn between steps (validation.prompts x images_per_prompt)
    optimizer: str | None = None  # optim.name (None: adamw, or adamw8bit with adam_8bit)
    ema: str | None = None  # where the EMA copy of the trainable weights lives: "cuda", "cpu" or None (no EMA)
    candidate_batch: int = 0  # styledrop.rounds > 1: candidates drawn per sampling call between rounds (0: none)

    @property
    def optimizer_name(self) -> str:
        return self.optimizer or ("adamw8bit" if self.adam_8bit else "adamw")

    def step_setup(self):
        from amused_tune.memory.trace import StepSetup

        frozen = self.frozen_dtype if not self.quantize else (self.autocast if self.autocast != "fp32" else "bf16")
        return StepSetup(self.resolution, self.autocast, frozen, self.full, self.lora_rank, self.lora_targets,
                         self.grad_checkpointing, self.loss)


@dataclass
class Row:
    what: str
    detail: str
    bytes: int

    @property
    def gb(self) -> float:
        return self.bytes / GB


@dataclass
class Estimate:
    """What the GPU holds at each moment of a run, and the peak (GB: 10^9 bytes)."""

    plan: Plan
    rows: list[Row] = field(default_factory=list)  # held for the whole run (weights, gradients, optimizer)
    moments: dict[str, tuple[int, str]] = field(default_factory=dict)  # moment -> (bytes on top, what)
    resident: dict[str, int] = field(default_factory=dict)  # moment -> bytes of `rows` held then

    def at(self, moment: str) -> int:
        return self.resident[moment] + self.moments[moment][0]

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.at)

    @property
    def peak_bytes(self) -> int:
        return self.at(self.peak_moment)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def table(self) -> str:
        lines = [f"{'held on the GPU':<34} {'':<40} {'GB':>6}"]
        lines += [f"{r.what:<34} {r.detail:<40} {r.gb:6.2f}" for r in self.rows]
        lines.append("at each moment of the run (held then + transient):")
        for moment, (extra, what) in self.moments.items():
            lines.append(f"  {moment:<32} {what:<40} {self.at(moment) / GB:6.2f}")
        lines.append(f"{'predicted peak':<34} {'(' + self.peak_moment + ')':<40} {self.peak_gb:6.2f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the plans


def resolution_of(recipe) -> int:
    """256 or 512: the real-size aMUSEd a recipe trains; EstimateError for the tiny and toy models."""
    base = recipe.model.base
    res = recipe.model.resolution
    if res is None:
        folder = Path(base).expanduser() / "transformer" / "config.json"
        if folder.is_file():
            res = int(json.loads(folder.read_text()).get("sample_size", 0)) * 16
        elif base.startswith("amused/amused-"):
            res = int(base.rsplit("-", 1)[1]) if base.rsplit("-", 1)[1].isdigit() else None
    if res not in (256, 512) or base in ("tiny", "toy"):
        raise EstimateError(f"model.base={base}: the memory estimate covers the real-size aMUSEd bases "
                            "(amused/amused-256, amused/amused-512 or a copy of them), not the CPU-sized models")
    return res


def plan_of(recipe) -> Plan:
    """What the kit's trainer keeps on the GPU for `recipe`."""
    a, t = recipe.adapter, recipe.train
    return Plan(
        resolution=resolution_of(recipe), full=a.kind == "full", frozen_dtype=recipe.model.dtype,
        text_dtype=recipe.model.dtype, vq_dtype="fp32", cache=recipe.data.cache,
        text_lora=(a.kind != "full" and a.text_encoder) or recipe.data.shuffle_tags, quantize=recipe.model.quantize if a.kind != "full" else None,
        # prior preservation (recipe.prior) adds a batch of the base's own images to every micro-batch
        adam_8bit=recipe.optim.adam_8bit, batch_size=t.batch_size * (2 if recipe.prior.prompts else 1),
        grad_accum=t.grad_accum, autocast=t.precision,
        grad_checkpointing=t.grad_checkpointing, lora_rank=a.rank, lora_targets=tuple(a.targets),
        adapter_kind=a.kind if a.kind != "full" else "lora",
        validation_images=len(recipe.validation.prompts) * recipe.validation.images_per_prompt,
        optimizer=recipe.optim.resolved_name, ema=ema_device(recipe),
        candidate_batch=recipe.styledrop.batch_size if recipe.styledrop.rounds > 1 else 0)


def ema_device(recipe) -> str | None:
    """Where the run keeps its EMA weights on a GPU machine: "cuda", "cpu", or None without train.ema_decay."""
    t = recipe.train
    if not getattr(t, "ema_decay", 0):
        return None
    return "cpu" if t.ema_device == "cpu" else "cuda"


def reference_plan(resolution: int, full: bool, adam_8bit: bool, batch_size: int, grad_accum: int) -> Plan:
    """What diffusers' train_amused.py keeps on the GPU (fp16 mixed precision, rank-16 QKV LoRA or full)."""
    return Plan(resolution=resolution, full=full, frozen_dtype="fp32", text_dtype="fp16", vq_dtype="fp32",
                cache=False, text_lora=False, quantize=None, adam_8bit=adam_8bit, batch_size=batch_size,
                grad_accum=grad_accum, autocast="fp16", grad_checkpointing=False, loss="reference")


# --------------------------------------------------------------------------------------------- counting


@functools.lru_cache(maxsize=8)
def parameter_counts(resolution: int, rank: int, targets: tuple[str, ...], kind: str = "lora") -> dict:
    """Element counts of the real-size parts, from a meta-device build: U-ViT linear weights (what 8/4-bit
    quantization replaces, with their output rows and biases) and the rest, the adapter's tensors (`kind`: lora,
    dora, lokr or loha), text encoder, VQ."""
    import torch

    from amused_tune.model.adapters import WEIGHT_PREFIXES, attach_lora
    from amused_tune.memory.trace import _meta_components

    comps = _meta_components(resolution)
    uvit = comps.transformer
    linears = [m for m in uvit.modules() if type(m) is torch.nn.Linear]
    linear_w = sum(m.weight.numel() for m in linears)
    counts = {
        "uvit": sum(p.numel() for p in uvit.parameters()),
        "uvit_linear_weight": linear_w,
        "uvit_linear_rows": sum(m.out_features for m in linears),
        "uvit_linear_bias": sum(m.bias.numel() for m in linears if m.bias is not None),
        "uvit_sizes": [p.numel() for p in uvit.parameters()],
        "uvit_shapes": [tuple(p.shape) for p in uvit.parameters()],
        "text": sum(p.numel() for p in comps.text_encoder.parameters()),
        "text_buffers": sum(b.numel() for b in comps.text_encoder.buffers()),
        "vq": sum(p.numel() for p in comps.vqvae.parameters()),
    }
    attach_lora(uvit, rank, 2.0 * rank, list(targets), kind=kind)
    trained = [p for n, p in uvit.named_parameters() if any(f in n for f in WEIGHT_PREFIXES)]
    counts["lora_sizes"] = [p.numel() for p in trained]
    counts["lora_shapes"] = [tuple(p.shape) for p in trained]
    return counts


def quantized_uvit_bytes(counts: dict, bits: int, compute_bytes: int) -> int:
    """The frozen U-ViT with its linear layers in bitsandbytes 8-bit (int8 + an fp32 scale per row) or 4-bit
    (NF4 with double-quantized block scales); biases in the compute dtype; everything else in the compute dtype."""
    w = counts["uvit_linear_weight"]
    if bits == 8:
        linear = w + 4 * counts["uvit_linear_rows"]
    else:
        blocks = math.ceil(w / NF4_BLOCK)
        linear = w // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)
    rest = counts["uvit"] - w - counts["uvit_linear_bias"]
    return linear + compute_bytes * (counts["uvit_linear_bias"] + rest)


def linear_in_batch(trace, batch: int, attr: str) -> int:
    """A traced quantity at batch 1 and 2, extended to `batch` (every activation scales with the batch; weight
    copies made by autocast do not); timelines are extended moment by moment and their peak taken."""
    from amused_tune.memory.trace import TRACED_BATCHES, peak_at

    low, high = TRACED_BATCHES
    first, second = getattr(trace(low), attr), getattr(trace(high), attr)
    if isinstance(first, tuple):
        return peak_at(first, second, batch)
    return max(0, first + (second - first) * (batch - low) // (high - low))


def weight_rows(plan: Plan, counts: dict) -> list[Row]:
    frozen_b = DTYPE_BYTES[plan.frozen_dtype]
    lora = sum(counts["lora_sizes"])
    rows = []
    if plan.full:
        rows.append(Row("U-ViT weights (trainable)", f"{counts['uvit'] / 1e6:.0f}M x fp32", 4 * counts["uvit"]))
    else:
        if plan.quantize:
            bits = 8 if plan.quantize == "8bit" else 4
            size = quantized_uvit_bytes(counts, bits, 2 if plan.frozen_dtype == "fp32" else frozen_b)
            detail = f"{counts['uvit'] / 1e6:.0f}M, linears in {plan.quantize}"
        else:
            size, detail = frozen_b * counts["uvit"], f"{counts['uvit'] / 1e6:.0f}M x {plan.frozen_dtype}"
        rows.append(Row("U-ViT weights (frozen)", detail, size))
        label = "LoRA" if plan.adapter_kind == "lora" else {"dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}[plan.adapter_kind]
        rows.append(Row(f"{label} weights (trainable)", f"{lora / 1e6:.2f}M x fp32, rank {plan.lora_rank}", 4 * lora))
    if plan.cache and not plan.text_lora:
        rows.append(Row("text encoder", "off the GPU (data.cache)", 0))
    else:
        n = counts["text"] + counts["text_buffers"]
        rows.append(Row("text encoder", f"{counts['text'] / 1e6:.0f}M x {plan.text_dtype}", DTYPE_BYTES[plan.text_dtype] * n))
    if plan.cache:
        rows.append(Row("VQ model", "off the GPU (data.cache)", 0))
    else:
        rows.append(Row("VQ model", f"{counts['vq'] / 1e6:.0f}M x {plan.vq_dtype}", DTYPE_BYTES[plan.vq_dtype] * counts["vq"]))
    return rows


def trainable_sizes(plan: Plan, counts: dict) -> list[int]:
    return list(counts["uvit_sizes"]) if plan.full else list(counts["lora_sizes"])


def estimate_plan(plan: Plan) -> Estimate:
    """The estimate for what a trainer keeps on the GPU (see `plan_of`, `reference_plan`)."""
    from amused_tune.memory.trace import TRACED_BATCHES, peak_at, trace_encode, trace_step

    counts = parameter_counts(plan.resolution, plan.lora_rank, plan.lora_targets, plan.adapter_kind)
    sizes = trainable_sizes(plan, counts)
    est = Estimate(plan, weight_rows(plan, counts))
    grads = 4 * sum(sizes)
    optimizer = OPTIMIZERS[plan.optimizer_name]
    shapes = counts["uvit_shapes"] if plan.full else counts["lora_shapes"]
    est.rows.append(Row("gradients", f"{sum(sizes) / 1e6:.2f}M x fp32", grads))
    est.rows.append(Row("optimizer state", optimizer.state, optimizer.state_bytes(shapes)))
    if plan.ema:
        est.rows.append(Row("EMA weights", f"{sum(sizes) / 1e6:.2f}M x fp32, train.ema_device",
                            4 * sum(sizes) if plan.ema == "cuda" else 0))
    est.rows.append(Row("CUDA workspace", "cuBLAS", CUDA_WORKSPACE))
    weights = sum(r.bytes for r in est.rows) - grads
    accumulating = plan.grad_accum > 1  # gradients stay between the micro-steps of an optimizer step

    setup, b = plan.step_setup(), plan.batch_size
    trace = functools.partial(trace_step, setup)
    step = linear_in_batch(trace, b, "timeline_accumulating" if accumulating else "timeline")
    saved = linear_in_batch(trace, b, "saved")
    ckpt = ", checkpointed" if plan.grad_checkpointing else ""
    est.rows.append(Row("activations saved for backward", f"batch {b}, {plan.autocast} autocast{ckpt}", saved))
    if plan.cache:
        add_cache_building(est, plan, counts)
    est.moments["forward/backward"] = (step, "activations, logits, loss, backward")
    est.resident["forward/backward"] = weights + (grads if accumulating else 0)
    if not plan.cache or plan.text_lora:
        cast = plan.autocast if plan.loss == "kit" else "fp32"  # the reference encodes outside autocast
        (vq1, text1), (vq2, text2) = (trace_encode(plan.resolution, n, plan.vq_dtype, plan.text_dtype, cast)
                                      for n in TRACED_BATCHES)
        if not plan.cache:
            est.moments["VQ encode (not cached)"] = (peak_at(vq1, vq2, b), f"batch {b} at {plan.resolution} px")
            est.resident["VQ encode (not cached)"] = est.resident["forward/backward"]
        est.moments["text encoder forward"] = (peak_at(text1, text2, b), f"batch {b}, 77 tokens")
        est.resident["text encoder forward"] = est.resident["forward/backward"]
    if plan.loss == "reference":  # its loop's `logits` (fp32) outlives the step, into the next batch's encoding
        held = 4 * b * (plan.resolution // 16) ** 2 * CODEBOOK
        for moment in ("VQ encode (not cached)", "text encoder forward"):
            est.resident[moment] += held
    est.moments["optimizer step"] = (optimizer.step_bytes(grads, shapes), optimizer.step_note)
    est.resident["optimizer step"] = weights + grads
    if plan.validation_images:
        add_validation(est, plan, counts, weights)
    if plan.candidate_batch:
        add_candidates(est, plan, counts)
    return est


def add_validation(est: Estimate, plan: Plan, counts: dict, weights: int) -> None:
    """The sample grid drawn between steps (gradients freed): the U-ViT's sampling passes (prompts and empty
    prompt together), then the VQ model decoding the grid one image at a time, on the GPU for that even when the
    cache parked it."""
    from amused_tune.memory.trace import TRACED_BATCHES, peak_at, trace_decode, trace_sampling

    n = plan.validation_images
    sampling = peak_at(*(trace_sampling(plan.step_setup(), k) for k in TRACED_BATCHES), 2 * n)
    decode = peak_at(*(trace_decode(plan.resolution, k, plan.vq_dtype) for k in TRACED_BATCHES), 1)
    vq = DTYPE_BYTES[plan.vq_dtype] * counts["vq"] if plan.cache else 0
    est.moments["validation: sampling"] = (sampling, f"{n} images with guidance ({2 * n} rows)")
    est.resident["validation: sampling"] = weights
    where = ", VQ back on the GPU" if vq else ""
    est.moments["validation: VQ decode"] = (vq + decode, f"1 image at a time{where}")
    est.resident["validation: VQ decode"] = weights


def add_candidates(est: Estimate, plan: Plan, counts: dict) -> None:
    """StyleDrop's candidate draw between rounds (styledrop.rounds > 1; no training state then): the base with the
    round's LoRA, text encoder and VQ model all on the GPU, sampling `candidate_batch` prompts with guidance (twice
    the rows), then decoding that batch at once."""
    from amused_tune.memory.trace import TRACED_BATCHES, peak_at, trace_decode, trace_sampling

    n = plan.candidate_batch
    weights = (DTYPE_BYTES[plan.frozen_dtype] * counts["uvit"] + 4 * sum(counts["lora_sizes"])
               + DTYPE_BYTES[plan.text_dtype] * (counts["text"] + counts["text_buffers"])
               + DTYPE_BYTES["fp32"] * counts["vq"] + CUDA_WORKSPACE)
    sampling = peak_at(*(trace_sampling(plan.step_setup(), k) for k in TRACED_BATCHES), 2 * n)
    decode = peak_at(*(trace_decode(plan.resolution, k, "fp32") for k in TRACED_BATCHES), n)
    est.moments["styledrop candidates: sampling"] = (sampling, f"{n} prompts with guidance ({2 * n} rows)")
    est.resident["styledrop candidates: sampling"] = weights
    est.moments["styledrop candidates: VQ decode"] = (decode, f"{n} images at once")
    est.resident["styledrop candidates: VQ decode"] = weights


def add_cache_building(est: Estimate, plan: Plan, counts: dict) -> None:
    """Building the cache (first run over the data): the VQ model and text encoder alone on the GPU (the trainer
    places the U-ViT afterwards), encoding `cache_batches` images or prompts at a time without autocast."""
    from amused_tune.memory.trace import TRACED_BATCHES, peak_at, trace_encode

    images, prompts = cache_batches(plan.resolution)
    encoders = (DTYPE_BYTES[plan.vq_dtype] * counts["vq"]
                + DTYPE_BYTES[plan.text_dtype] * (counts["text"] + counts["text_buffers"]))
    (vq1, text1), (vq2, text2) = (trace_encode(plan.resolution, n, plan.vq_dtype, plan.text_dtype, "fp32")
                                  for n in TRACED_BATCHES)
    work = max(peak_at(vq1, vq2, images), peak_at(text1, text2, prompts))
    est.moments[ENCODING] = (encoders + CUDA_WORKSPACE + work, f"first run on the data, {images} at a time")
    est.resident[ENCODING] = 0


def estimate(recipe, trainer: str = "amused-tune") -> Estimate:
    """Predict the peak GPU memory of training `recipe` with the kit (or, `trainer="reference"`, with diffusers'
    train_amused.py at the recipe's resolution, mode, batch and accumulation)."""
    plan = plan_of(recipe)
    if trainer == "reference":
        plan = reference_plan(plan.resolution, plan.full, plan.adam_8bit, plan.batch_size, plan.grad_accum)
    return estimate_plan(plan)

