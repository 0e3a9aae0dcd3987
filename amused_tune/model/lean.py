"""Leaner equivalents of the U-ViT's most frequent per-block operations, for training.

At batch 1 a GPU training step is bound by how many operators it launches, not by arithmetic: aMUSEd's U-ViT with a
LoRA on its 168 q/k/v projections dispatches ~11,000 ATen operators per forward + backward, and a third of them are
peft's LoRA wrappers (each LoRA linear: the base matmul, two LoRA matmuls, a scaling and an add, each with its
transposes and reshapes, ~38 operators forward + backward). `make_lean(model)` swaps, in place and per module:

- each plain LoRA linear (peft's `lora.Linear` on an `nn.Linear`, one active adapter, no dropout, no DoRA, no
  LoRA bias) for one autograd function computing the same y = x W^T + b + s (x A^T) B^T and its gradients in 19
  operators (the LoRA product added into the base's output by one addmm);
- each diffusers `RMSNorm` whose input and weight share a dtype: on CUDA torch's fused RMS norm (one kernel
  forward, one backward, where diffusers' launches six and about twelve); on the CPU in fp32 one autograd function
  with diffusers' forward and a backward of 7 operators instead of ~12.

The same maths: the forward in fp32 is diffusers' operations in the same order, the gradients equal up to the order
of float roundings (tests/test_lean.py); in half precision the fused norm rounds once where diffusers' rounds
twice. Anything else (two adapters, DoRA, dropout, a quantized base,
a merged or disabled adapter, a norm with a bias) takes the original path, checked at every call, so sampling with
several adapters, merging and saving behave as before. Parameters and module names do not change.
"""

from __future__ import annotations

import types

import torch

FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")  # torch >= 2.8 (the kit allows older)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T (+ b) + s (x A^T) B^T, over the last dimension of x; gradients for x, A, B (W, b when they train).
    `wt`, `at`, `bt` are W^T, A^T, B^T (views the caller keeps from call to call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, wt, at, bt):
        x2 = x.reshape(-1, x.shape[-1])
        xa = torch.mm(x2, at)
        y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
        y.addmm_(xa, bt, alpha=scale)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale, ctx.shape = scale, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gxa = torch.mm(g, b).mul_(ctx.scale) if (need_x or need_a) else None  # d loss / d (x A^T)
        if need_x:
            grad_x = torch.mm(g, weight).addmm_(gxa, a).view(ctx.shape)
        if need_a:
            grad_a = torch.mm(gxa.t(), x2)
        if need_b:
            grad_b = torch.mm(g.t(), xa).mul_(ctx.scale)
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def _transposed(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """tensor^T as a view kept on `module` from call to call (one operator less per use), made again when the
    tensor's storage changes (a move, a cast, `.data =`); in-place updates (the optimizer's) show through it."""
    if torch.compiler.is_compiling():
        return tensor.t()
    cache = module.__dict__.setdefault("_lean_transposed", {})
    held = cache.get(key)
    if (held is None or held.data_ptr() != tensor.data_ptr() or held.dtype != tensor.dtype
            or held.device != tensor.device or held.shape != tensor.shape[::-1]):
        held = cache[key] = tensor.detach().t()
    return held


def lora_linear(x, weight, bias, a, b, scale: float, holder: torch.nn.Module | None = None) -> torch.Tensor:
    """The LoRA linear as one autograd function (`holder`: the module that keeps the transposed weights). Under
    autocast, every input is cast to the autocast dtype first, as autocast casts a linear's inputs (peft's path
    computes in that dtype too)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight, a, b = (t if t.dtype == dtype else t.to(dtype) for t in (x, weight, a, b))
        bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _LoraLinear.apply(x, weight, bias, a, b, scale, weight.t(), a.t(), b.t())
    if holder is None:
        return _LoraLinear.apply(x, weight, bias, a, b, scale, weight.t(), a.t(), b.t())
    return _LoraLinear.apply(x, weight, bias, a, b, scale, _transposed(holder, "weight", weight),
                             _transposed(holder, "a", a), _transposed(holder, "b", b))


def _plain_lora_adapter(layer) -> str | None:
    """The one active adapter of a peft LoRA linear that the lean path computes exactly, else None."""
    if layer.merged or layer.disable_adapters or type(layer.base_layer) is not torch.nn.Linear:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if (layer.use_dora.get(name) or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
            or layer.lora_B[name].bias is not None):
        return None
    return name


def _lean_lora_forward(self, x, *args, **kwargs):
    name = None if args or kwargs else _plain_lora_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], self)


class _RMSNorm(torch.autograd.Function):
    """y = x rsqrt(mean(x^2) + eps) (* w) over the last dimension, diffusers' operations in its order forward;
    backward written out: dx = r (g w - x r^2 mean(g w x)), dw = sum of g x r."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        y = x * r
        ctx.save_for_backward(x, r, weight)
        return y if weight is None else y * weight

    @staticmethod
    def backward(ctx, grad):
        x, r, weight = ctx.saved_tensors
        gn = grad if weight is None else grad * weight  # d loss / d (x r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            c = (gn * x).mean(-1, keepdim=True).mul_(r).mul_(r)
            grad_x = torch.addcmul(gn, x, c, value=-1).mul_(r)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (grad * x * r).flatten(0, -2).sum(0)
        return grad_x, grad_w, None


def _lean_rms_norm_forward(self, hidden_states):
    weight = self.weight
    if self.bias is not None or (weight is not None and weight.dtype != hidden_states.dtype):
        return type(self).forward(self, hidden_states)
    if hidden_states.is_cuda and FUSED_RMS_NORM:  # one kernel forward, one backward
        return torch.ops.aten._fused_rms_norm(hidden_states, list(self.dim), weight, self.eps)[0]
    if hidden_states.dtype != torch.float32 or len(self.dim) != 1:  # diffusers' own (fp32 statistics of halves)
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, weight, self.eps)


def make_lean(model: torch.nn.Module) -> dict[str, int]:
    """Give `model`'s plain LoRA linears and RMS norms their lean forward (per module, in place; idempotent).
    Returns how many modules of each kind now have it."""
    from diffusers.models.normalization import RMSNorm
    from peft.tuners.lora import Linear as LoraLinear

    done = {"lora_linear": 0, "rms_norm": 0}
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear:
            module.forward = types.MethodType(_lean_lora_forward, module)
            done["lora_linear"] += 1
        elif isinstance(module, RMSNorm) and type(module).forward is RMSNorm.forward:
            module.forward = types.MethodType(_lean_rms_norm_forward, module)
            done["rms_norm"] += 1
    return done


def undo_lean(model: torch.nn.Module) -> None:
    """Back to every module's own forward."""
    for module in model.modules():
        if getattr(module.forward, "__func__", None) in (_lean_lora_forward, _lean_rms_norm_forward):
            del module.forward
