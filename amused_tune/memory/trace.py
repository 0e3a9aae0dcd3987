"""Measure what one training micro-step of the real-size aMUSEd holds on the GPU, without a GPU.

The models are built on the meta device (shapes, no weights, nothing downloaded) and one micro-step is run for
real on them: VQ encoding, the text encoder, the U-ViT forward, the loss and the backward. Meta tensors carry
shapes and dtypes but no data, so the run takes about a second and allocates nothing. Two things make it stand in
for a CUDA run:

- `GpuAutocast` applies CUDA autocast's casting rules (matmuls and convolutions in fp16/bf16; norms, softmax,
  losses in fp32) as the GPU would, since CPU autocast follows other rules;
- attention runs as the memory-efficient kernel that CUDA picks (it keeps the log-sum-exp, never the
  tokens x tokens attention matrix the CPU's fallback would build).

`LiveBytes` counts the bytes of every tensor storage created during the step while it is alive (rounded up to
the caching allocator's 512-byte blocks), so the peak includes the short-lived buffers (logits, the cross-entropy,
attention, gradients while the backward builds them) and the bytes alive when the backward starts are the
activations saved for it. Weights and buffers that exist before the step are not counted here: `memory.py`
counts them from the parameter shapes.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from amused_tune.common import torch_dtype

BLOCK = 512  # the CUDA caching allocator hands out multiples of 512 bytes
TEXT_TOKENS = 77

# CUDA autocast's lists (torch/csrc/autograd autocast_mode): run in the low precision ...
_LOW = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
        torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm, torch.Tensor.mm, torch.baddbmm,
        torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.einsum)
# ... run in fp32 ...
_FP32 = (F.layer_norm, F.group_norm, F.cross_entropy, F.nll_loss, F.mse_loss, torch.cdist, torch.exp,
         torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.rsqrt,
         torch.Tensor.rsqrt, torch.logsumexp, F.softplus, F.softmax, torch.softmax, torch.Tensor.softmax,
         F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax)


def _cast(value, dtype: torch.dtype):
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    return tree_map(one, value)


class GpuAutocast(TorchFunctionMode):
    """CUDA autocast's casts, applied to tensors on any device (here: meta). `dtype=None` disables it."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _efficient_attention(*_cast(args, self.dtype) if self.dtype else args, **kwargs)
        if self.dtype is not None and func in _LOW:
            args, kwargs = _cast(args, self.dtype), _cast(kwargs, self.dtype)
        elif self.dtype is not None and func in _FP32:
            args, kwargs = _cast(args, torch.float32), _cast(kwargs, torch.float32)
        return func(*args, **kwargs)


def _efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What CUDA's scaled_dot_product_attention keeps: output and log-sum-exp (flash / memory-efficient kernels)."""
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)
    return out[0]


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive: `now`, the peak `max`, and a log
    of (storage serial, +bytes / -bytes) events for `peak(excluding=...)`."""

    def __init__(self, existing: set[int] = frozenset()):
        super().__init__()
        self.existing = set(existing)
        self.live: dict[int, tuple[int, int]] = {}  # storage address -> (serial, bytes)
        self.events: list[tuple[int, int]] = []
        self.now = 0
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self.live or key in self.existing:
            return
        nbytes = -(-storage.nbytes() // BLOCK) * BLOCK
        serial = len(self.events)
        self.live[key] = (serial, nbytes)
        self.events.append((serial, nbytes))
        self.now += nbytes
        self.max = max(self.max, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        serial, nbytes = self.live.pop(key, (0, 0))
        if nbytes:
            self.events.append((serial, -nbytes))
            self.now -= nbytes

    def serials(self, tensors) -> set[int]:
        """The serials of the (live) storages behind `tensors`."""
        return {self.live[k][0] for k in storage_keys(tensors) if k in self.live}

    def timeline(self, excluding: set[int] = frozenset()) -> tuple[int, ...]:
        """The live bytes after each event, not counting the storages whose serials are in `excluding`."""
        now, out = 0, []
        for serial, delta in self.events:
            if serial not in excluding:
                now += delta
            out.append(now)
        return tuple(out)


def storage_keys(tensors) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors}


@dataclass(frozen=True)
class StepSetup:
    """What a trainer runs one micro-step with, as far as memory goes (the key of the traced-numbers cache)."""

    resolution: int
    autocast: str  # fp32 (off), bf16, fp16: the U-ViT forward's autocast
    frozen_dtype: str  # the frozen U-ViT weights' dtype (LoRA); full fine-tuning trains fp32 weights
    full: bool
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v")
    grad_checkpointing: bool = False
    loss: str = "kit"  # kit: amused_tune.model.masking.masked_cross_entropy; reference: train_amused.py's mean CE


@dataclass(frozen=True)
class StepTrace:
    """One micro-step at one batch size, in bytes (weights and their gradients' storages excluded unless named).
    The timelines are the live bytes after each allocation or free: the same operations run at every batch size,
    so two traces give the live bytes of every moment at any batch (`peak_at`)."""

    saved: int  # alive when the backward starts: what autograd keeps for it
    timeline: tuple[int, ...]  # gradients created by the backward included
    timeline_accumulating: tuple[int, ...]  # gradients already exist (accumulation adds into them in place)
    grads: int  # bytes of the gradients the backward created

    @property
    def peak(self) -> int:
        return max(self.timeline)


TRACED_BATCHES = (2, 3)  # (at batch 1 some reshapes are free views: its trace would not line up with the others)


def peak_at(first: tuple[int, ...], second: tuple[int, ...], batch: int) -> int:
    """The peak at `batch` of live bytes traced at the two TRACED_BATCHES, moment by moment (each moment's live
    bytes are a fixed part, e.g. autocast's weight copies, plus a part proportional to the batch)."""
    if len(first) != len(second):
        raise ValueError("the traces at two batch sizes ran different operations")
    low, high = TRACED_BATCHES
    return max(a + (b - a) * (batch - low) // (high - low) for a, b in zip(first, second))


def _meta_components(resolution: int):
    from amused_tune.model.bases import build_real_size

    with torch.device("meta"):
        return build_real_size(resolution)


def _checkpoint_blocks(transformer, autocast: torch.dtype | None) -> None:
    """Non-reentrant activation checkpointing of each transformer layer and the U-ViT down/up blocks (as the kit
    does); the recomputation in the backward runs under the forward's casts, as CUDA autocast arranges."""
    from torch.utils.checkpoint import checkpoint

    def under_autocast(forward, *args, **kwargs):
        with GpuAutocast(autocast):
            return forward(*args, **kwargs)

    for block in [*transformer.transformer_layers, transformer.down_block, transformer.up_block]:
        inner = functools.partial(under_autocast, block.forward)
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def _uvit_for(setup: StepSetup):
    from amused_tune.model.adapters import attach_lora

    transformer = _meta_components(setup.resolution).transformer
    transformer.to = functools.partial(torch.nn.Module.to, transformer)  # (diffusers warns on every cast)
    if setup.full:
        transformer.float().requires_grad_(True)
    else:
        transformer.to(torch_dtype(setup.frozen_dtype))
        attach_lora(transformer, setup.lora_rank, 2.0 * setup.lora_rank, list(setup.lora_targets))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if setup.grad_checkpointing:
        _checkpoint_blocks(transformer, None if setup.autocast == "fp32" else torch_dtype(setup.autocast))
    return transformer.train()


def _loss(setup: StepSetup, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The loss, and what the trainer's loop keeps referenced through the backward."""
    if setup.loss == "reference":  # train_amused.py: `logits` (codes last, flattened) lives on in its loop
        b, v = logits.shape[:2]
        flat = logits.reshape(b, v, -1).permute(0, 2, 1).reshape(-1, v)
        return F.cross_entropy(flat, tokens.reshape(-1), ignore_index=-100), [flat]
    from amused_tune.model.masking import masked_cross_entropy

    return masked_cross_entropy(logits, tokens, torch.ones_like(tokens, dtype=torch.bool)), []


@functools.lru_cache(maxsize=64)
def trace_step(setup: StepSetup, batch: int) -> StepTrace:
    """Run one U-ViT micro-step (forward under the setup's autocast, fp32 logits as accelerate returns them, the
    loss, the backward) on meta tensors and count its bytes."""
    transformer = _uvit_for(setup)
    params = list(transformer.parameters()) + list(transformer.buffers())
    autocast = None if setup.autocast == "fp32" else torch_dtype(setup.autocast)
    side = setup.resolution // 16
    cond_dtype = autocast or torch.float32
    tracker = LiveBytes(storage_keys(params))
    with tracker:
        tokens = torch.zeros(batch, side, side, dtype=torch.long, device="meta")
        hidden = torch.empty(batch, TEXT_TOKENS, 768, dtype=cond_dtype, device="meta")
        pooled = torch.empty(batch, 768, dtype=cond_dtype, device="meta")
        micro = torch.empty(batch, 5, device="meta")
        with GpuAutocast(autocast):
            logits = transformer(tokens, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)
            logits = logits.float()  # accelerate's convert_outputs_to_fp32
            if setup.loss == "kit":  # the kit computes its loss inside autocast
                loss, kept = _loss(setup, logits, tokens)
        if setup.loss != "kit":
            loss, kept = _loss(setup, logits, tokens)
        del logits
        saved = tracker.now
        loss.backward()
        del loss, kept
    grads = [p.grad for p in transformer.parameters() if p.grad is not None]
    grad_bytes = sum(-(-g.untyped_storage().nbytes() // BLOCK) * BLOCK for g in grads)
    return StepTrace(saved=saved, timeline=tracker.timeline(),
                     timeline_accumulating=tracker.timeline(tracker.serials(grads)), grads=grad_bytes)


@functools.lru_cache(maxsize=32)
def trace_encode(resolution: int, batch: int, vq_dtype: str, text_dtype: str, autocast: str) -> tuple[tuple, tuple]:
    """Live-byte timelines of encoding one batch without the cache: (VQ encoder on the pixels, CLIP on the
    prompts). The pixel batch and the outputs are counted; no gradients."""
    comps = _meta_components(resolution)
    vq, text = comps.vqvae, comps.text_encoder.to(torch_dtype(text_dtype))
    torch.nn.Module.to(vq, torch_dtype(vq_dtype))  # (diffusers' own .to warns on every cast)
    existing = storage_keys([*vq.parameters(), *vq.buffers(), *text.parameters(), *text.buffers()])
    cast = None if autocast == "fp32" else torch_dtype(autocast)
    peaks = []
    with torch.no_grad(), GpuAutocast(cast):
        with LiveBytes(existing) as tracker:
            pixels = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=torch_dtype(vq_dtype))
            latents = vq.encode(pixels).latents
            _, _, (_, _, indices) = vq.quantize(latents)
            del pixels, latents, indices
        peaks.append(tracker.timeline())
        with LiveBytes(existing) as tracker:
            ids = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long, device="meta")
            out = text(ids, return_dict=True, output_hidden_states=True)
            del out
        peaks.append(tracker.timeline())
    return peaks[0], peaks[1]


@functools.lru_cache(maxsize=32)
def trace_sampling(setup: StepSetup, batch: int) -> tuple[int, ...]:
    """Live-byte timeline of one sampling pass of the U-ViT (no gradients) over `batch` rows: the validation
    grid's classifier-free guidance runs the prompts and the empty prompt together."""
    transformer = _uvit_for(setup).eval()
    existing = storage_keys([*transformer.parameters(), *transformer.buffers()])
    autocast = None if setup.autocast == "fp32" else torch_dtype(setup.autocast)
    side = setup.resolution // 16
    with torch.no_grad(), LiveBytes(existing) as tracker, GpuAutocast(autocast):
        tokens = torch.zeros(batch, side, side, dtype=torch.long, device="meta")
        hidden = torch.empty(batch, TEXT_TOKENS, 768, dtype=autocast or torch.float32, device="meta")
        pooled = torch.empty(batch, 768, dtype=autocast or torch.float32, device="meta")
        micro = torch.empty(batch, 5, device="meta")
        logits = transformer(tokens, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)
        probs = logits.float().softmax(dim=1)
        del logits, probs
    return tracker.timeline()


@functools.lru_cache(maxsize=32)
def trace_decode(resolution: int, batch: int, vq_dtype: str) -> tuple[int, ...]:
    """Live-byte timeline of decoding `batch` token grids to images with the VQ model (no gradients, no autocast)."""
    vq = _meta_components(resolution).vqvae
    torch.nn.Module.to(vq, torch_dtype(vq_dtype))
    existing = storage_keys([*vq.parameters(), *vq.buffers()])
    side = resolution // 16
    with torch.no_grad(), LiveBytes(existing) as tracker:
        tokens = torch.zeros(batch, side, side, dtype=torch.long, device="meta")
        images = vq.decode(tokens, force_not_quantize=True, shape=(batch, side, side, vq.config.latent_channels))
        images = images.sample.clamp(0, 1)
        del images
    return tracker.timeline()
